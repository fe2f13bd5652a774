"""Parameter and FLOP accounting, computed from a :class:`~core.config.ModelConfig` alone.

Nothing here builds a module: the counts follow each mixer's parameter layout (docs/architecture.md,
the ``core/layers`` modules) analytically, so they are available for an 8B preset in microseconds, and
tests check them against ``sum(p.numel())`` of built models, component by component.

Parameters
----------
:func:`layer_parameters` gives one block's parameters by component, named as the block's submodules
(``norm``, ``in_proj``, ``conv1d``, ``experts``, ...); :func:`count_parameters` sums the model:

- ``total``: every parameter once (a tied ``lm_head`` is the embedding, counted once);
- ``embedding``: the input embedding, plus the output head when it is not tied (padded vocab rows
  included: they are parameters even if no token uses them);
- ``non_embedding``: ``total - embedding`` (Kaplan et al.'s N);
- ``active``: what one token uses: a MoE block counts its router and ``top_k`` of its ``n_experts``
  experts.

FLOPs
-----
Forward FLOPs per token, by component, for sequences of ``seq_len`` tokens (:func:`layer_flops`,
:func:`flops_breakdown`). A multiply-add is 2 FLOPs; a matmul [m, k] x [k, n] is ``2 m n k``, so a
Linear of ``in`` -> ``out`` features costs ``2 in out`` per token (its bias add is not counted, as
``torch.utils.flop_counter`` does not count it). Training FLOPs per token are 3x forward
(:func:`training_flops_per_token`): the backward of a matmul is two matmuls of the same size (the input
and the weight gradients). Activation recomputation is not counted.

What each component counts:

- Linear layers (all projections, the router, the LM head over the padded vocab): exact, ``2 in out``.
- ``attention`` (scores ``Q K^T`` and ``P V``): ``2 * 2 * n_heads * head_dim * seq_len`` per token, the
  full L x L products, as ``torch.utils.flop_counter`` counts ``scaled_dot_product_attention`` and as a
  masked dense kernel computes them. A causal kernel that skips masked blocks (flash-attention) does
  about half of that; the softmax (O(L) per token and head) is not counted.
- ``experts`` (MoE): ``top_k`` expert MLPs per token, i.e. dropless routing; with a capacity factor
  dropped tokens would cost less.
- ``conv1d`` / ``short_filter`` (depthwise causal convs): ``2 * channels * width``, exact for the conv
  itself (as the flop counter counts ``aten.convolution``).
- ``scan`` (Mamba-1 selective scan): approximate, ``9 * d_inner * d_state + 2 * d_inner`` per token:
  per (channel, state) the discretization exp(dt A) (2), dt B u (2), the recurrence multiply-add (2),
  C h multiply-add (2) and the dt broadcast (1), as the usual ``flops_selective_scan`` estimates count
  (VMamba, mamba_ssm's benchmarks); plus the D skip. Softplus, SiLU and the z gate are not counted.
- ``ssd`` (Mamba-2): approximate, the matmuls of the chunked SSD algorithm with chunk
  ``Q = min(chunk_size, seq_len)``: intra-chunk ``C B^T`` (``2 Q N G``) and ``(L o C B^T) X``
  (``2 Q d_inner``), chunk states ``B^T X`` and their output ``C h`` (``2 N d_inner`` each), the state
  passing between chunks (``2 N d_inner / Q``) and the D skip (``2 d_inner``). Decay exponentials and
  cumulative sums are not counted.
- Hyena: ``fft_conv`` approximates each long convolution by real FFTs of 2L points at
  ``2.5 n log2 n`` FLOPs each (input forward, product inverse, and the filter's, shared by the batch),
  the (L+1)-bin complex product (6 per bin) and the skip term; ``filter_fn`` is the implicit filter MLP
  evaluated at every position once per forward, so per token it is divided by ``batch_size``
  (default 1: an upper bound); ``gates`` are the elementwise gate products.
- S4D (``L``): ``kernel`` is the Vandermonde product that builds the convolution kernel (about 8
  FLOPs per mode and position, once per forward: divided by ``batch_size``), ``fft_conv`` as Hyena's.
- Not counted anywhere: norms, activations, residual adds, the embedding lookup, the loss.

``torch.utils.flop_counter.FlopCounterMode`` sees matmuls (``mm``/``addmm``/``bmm``), convolutions and
attention kernels it knows (on CPU ``scaled_dot_product_attention`` only through the math backend), but
not FFTs nor elementwise ops, and it counts whatever the scan implementations happen to express as
matmuls. The tests compare it exactly with the Linear, attention and MoE components above.

Inference cache
---------------
:func:`cache_bytes` gives the bytes of the :class:`~core.cache.InferenceCache` that
``CausalLM.allocate_cache(batch, seqlen, dtype=dtype)`` allocates, by kind (the tests allocate caches
and compare tensor by tensor):

- ``kv``: attention keys and values, 2 x [B, n_kv_heads, seqlen, head_dim] in the cache dtype;
- ``kv_mask``: attention's ``valid`` mask, bool [B, seqlen] (which cached positions are real tokens);
- ``conv_state``: the short convolutions' last inputs, Mamba-1 [B, d_inner, d_conv - 1], Mamba-2
  [B, d_inner + 2 ngroups d_state, d_conv - 1], Hyena [B, (order + 1) d_model, short_filter_order - 1],
  in the cache dtype;
- ``ssm_state``: Mamba-1 [B, d_inner, d_state], Mamba-2 [B, nheads, headdim, d_state], float32 whatever
  the cache dtype (float64 for a float64 cache) unless ``ssm_state_dtype`` says otherwise (bfloat16 /
  float16 halve it); S4D [B, d_model, d_state] complex64 (complex128);
- ``hyena_history``: Hyena's long-convolution inputs, (order - 1) x [B, d_model, seqlen], cache dtype.

Only ``kv``, ``kv_mask`` and ``hyena_history`` grow with the sequence. Small bookkeeping tensors a cache
may add (per-row lengths for CUDA-graph decoding, a few bytes per sequence and layer) are not counted.
:data:`REFERENCE_CONFIGS` holds the shapes of Llama-2 7B, Mistral 7B and Mixtral 8x7B (not training
presets: the models of the Jamba paper's KV-cache table, which ``scripts/report_memory.py`` reproduces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core import pattern as P
from core.cache import ssm_state_dtype_for
from core.config import AttentionConfig, MLPConfig, ModelConfig, MoEConfig
from core.layers.mlp import mlp_hidden_size

# --------------------------------------------------------------------------------------------------
# Shapes derived from the config (the same rules the mixers use)
# --------------------------------------------------------------------------------------------------


def attention_dims(config: ModelConfig) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of the attention blocks."""
    c = config.attention
    n_kv = c.n_heads if c.n_kv_heads is None else c.n_kv_heads
    head_dim = config.d_model // c.n_heads if c.head_dim is None else c.head_dim
    return c.n_heads, n_kv, head_dim


def mamba2_dims(config: ModelConfig) -> dict[str, int]:
    """Mamba-2 widths: d_inner, nheads, conv_dim and the in_proj width (z, xBC, dt)."""
    c = config.mamba2
    d_inner = c.expand * config.d_model
    nheads = d_inner // c.headdim
    conv_dim = d_inner + 2 * c.ngroups * c.d_state
    return {"d_inner": d_inner, "nheads": nheads, "conv_dim": conv_dim, "d_in_proj": d_inner + conv_dim + nheads}


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def mixer_parameters(char: str, config: ModelConfig) -> dict[str, int]:
    """Parameters of the mixer of a ``char`` block, by submodule / parameter name of that mixer."""
    d = config.d_model
    if char == P.MAMBA1:
        c = config.mamba1
        d_inner, r, n = c.expand * d, c.resolved_dt_rank(d), c.d_state
        counts = {
            "in_proj": _linear(d, 2 * d_inner, c.bias),
            "conv1d": d_inner * c.d_conv + (d_inner if c.conv_bias else 0),
            "x_proj": _linear(d_inner, r + 2 * n, False),
            "dt_proj": _linear(r, d_inner, True),
            "A_log": d_inner * n,
            "D": d_inner,
            "out_proj": _linear(d_inner, d, c.bias),
        }
        if c.inner_norms:
            counts.update(dt_layernorm=r, b_layernorm=n, c_layernorm=n)
        return counts
    if char == P.MAMBA2:
        c = config.mamba2
        dims = mamba2_dims(config)
        d_inner, nheads, conv_dim = dims["d_inner"], dims["nheads"], dims["conv_dim"]
        return {
            "in_proj": _linear(d, dims["d_in_proj"], c.bias),
            "conv1d": conv_dim * c.d_conv + (conv_dim if c.conv_bias else 0),
            "dt_bias": nheads,
            "A_log": nheads,
            "D": d_inner if c.D_has_hdim else nheads,
            "norm": d_inner,
            "out_proj": _linear(d_inner, d, c.bias),
        }
    if char == P.ATTENTION:
        c = config.attention
        n_heads, n_kv, head_dim = attention_dims(config)
        return {
            "q_proj": _linear(d, n_heads * head_dim, c.qkv_bias),
            "k_proj": _linear(d, n_kv * head_dim, c.qkv_bias),
            "v_proj": _linear(d, n_kv * head_dim, c.qkv_bias),
            "o_proj": _linear(n_heads * head_dim, d, c.out_bias),
        }
    if char == P.MLP:
        c = config.mlp
        hidden = mlp_hidden_size(d, c)
        counts = {}
        if c.activation == "swiglu":
            counts["gate_proj"] = _linear(d, hidden, c.bias)
        counts["up_proj"] = _linear(d, hidden, c.bias)
        counts["down_proj"] = _linear(hidden, d, c.bias)
        return counts
    if char == P.MOE:
        c = config.moe
        hidden = mlp_hidden_size(d, c)
        matrices = 3 if c.activation == "swiglu" else 2
        return {"router": d * c.n_experts, "experts": c.n_experts * matrices * d * hidden}
    if char == P.HYENA:
        c = config.hyena
        inner = (c.order + 1) * d
        channels = (c.order - 1) * d
        width = c.filter_order
        filter_fn = (
            _linear(c.filter_emb_dim, width, True)
            + width  # the Sin frequencies, one vector shared by every Sin of the MLP
            + c.filter_layers * _linear(width, width, True)
            + _linear(width, channels, False)
            + (channels if c.filter_bias else 0)
        )
        return {
            "in_proj": _linear(d, inner, True),
            "short_filter": inner * c.short_filter_order + inner,
            "filter_fn": filter_fn,
            "out_proj": _linear(d, d, True),
        }
    if char == P.S4D:
        c = config.s4d
        complex_modes = c.mode == "complex"
        counts = {"log_dt": d, "A_log": d * c.d_state}
        if complex_modes:
            counts["A_imag"] = d * c.d_state
        counts.update(C=d * c.d_state * (2 if complex_modes else 1), D=d,
                      out_proj=_linear(d, 2 * d if c.glu else d, True))
        return counts
    P.validate_pattern(char)
    raise AssertionError(f"no parameter rule for block {char!r}")


def active_mixer_parameters(char: str, config: ModelConfig) -> int:
    """Parameters one token uses in a ``char`` block's mixer (MoE: router + top_k experts)."""
    counts = mixer_parameters(char, config)
    if char == P.MOE:
        c = config.moe
        return counts["router"] + counts["experts"] // c.n_experts * c.top_k
    return sum(counts.values())


def layer_parameters(char: str, config: ModelConfig) -> dict[str, int]:
    """One block's parameters by component, keyed by the block's module names: ``norm`` and
    ``mixer.<name>`` for each component of :func:`mixer_parameters`."""
    counts = {"norm": config.d_model}
    counts.update({f"mixer.{name}": n for name, n in mixer_parameters(char, config).items()})
    return counts


@dataclass
class ParameterCount:
    """A model's parameter count (see the module docstring for the definitions)."""

    total: int
    embedding: int
    non_embedding: int
    active: int
    per_layer: list[dict[str, int]] = field(default_factory=list)  # layer_parameters of each block
    by_type: dict[str, int] = field(default_factory=dict)  # block char -> total over those blocks
    norm_f: int = 0
    lm_head: int = 0  # 0 when tied

    def summary(self) -> str:
        return (f"total {self.total:,}  non-embedding {self.non_embedding:,}  embedding {self.embedding:,}  "
                f"active {self.active:,}")


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Parameters of ``CausalLM(config)``, analytically (equal to the built module's)."""
    d = config.d_model
    embedding = config.padded_vocab_size * d
    lm_head = 0 if config.tie_embeddings else config.padded_vocab_size * d
    per_layer = [layer_parameters(char, config) for char in config.pattern]
    by_type: dict[str, int] = {}
    active = embedding + lm_head + d  # + norm_f
    for char, counts in zip(config.pattern, per_layer):
        by_type[char] = by_type.get(char, 0) + sum(counts.values())
        active += counts["norm"] + active_mixer_parameters(char, config)
    blocks = sum(by_type.values())
    total = embedding + lm_head + blocks + d
    return ParameterCount(total=total, embedding=embedding + lm_head, non_embedding=total - embedding - lm_head,
                          active=active, per_layer=per_layer, by_type=by_type, norm_f=d, lm_head=lm_head)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def _fft_flops(n: int) -> float:
    """A real FFT (or inverse) of n points: 2.5 n log2 n (half of a complex FFT's 5 n log2 n)."""
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def layer_flops(char: str, config: ModelConfig, seq_len: int, batch_size: int = 1) -> dict[str, float]:
    """Forward FLOPs per token of one ``char`` block's mixer, by component (module docstring).

    ``batch_size`` only matters for costs paid once per forward whatever the batch (Hyena's filter).
    Components named like Linear submodules (``in_proj``, ``q_proj``, ...) are exact.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"layer_flops needs seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
    d = config.d_model
    if char == P.MAMBA1:
        c = config.mamba1
        d_inner, r, n = c.expand * d, c.resolved_dt_rank(d), c.d_state
        return {
            "in_proj": 2 * d * 2 * d_inner,
            "conv1d": 2 * d_inner * c.d_conv,
            "x_proj": 2 * d_inner * (r + 2 * n),
            "dt_proj": 2 * r * d_inner,
            "scan": 9 * d_inner * n + 2 * d_inner,
            "out_proj": 2 * d_inner * d,
        }
    if char == P.MAMBA2:
        c = config.mamba2
        dims = mamba2_dims(config)
        d_inner, n, g = dims["d_inner"], c.d_state, c.ngroups
        q = min(c.chunk_size, seq_len)
        ssd = 2 * q * n * g + 2 * q * d_inner + 2 * 2 * n * d_inner + 2 * n * d_inner / q + 2 * d_inner
        return {
            "in_proj": 2 * d * dims["d_in_proj"],
            "conv1d": 2 * dims["conv_dim"] * c.d_conv,
            "ssd": ssd,
            "out_proj": 2 * d_inner * d,
        }
    if char == P.ATTENTION:
        n_heads, n_kv, head_dim = attention_dims(config)
        return {
            "q_proj": 2 * d * n_heads * head_dim,
            "k_proj": 2 * d * n_kv * head_dim,
            "v_proj": 2 * d * n_kv * head_dim,
            "attention": 2 * 2 * n_heads * head_dim * seq_len,
            "o_proj": 2 * n_heads * head_dim * d,
        }
    if char == P.MLP:
        c = config.mlp
        hidden = mlp_hidden_size(d, c)
        flops = {"gate_proj": 2 * d * hidden} if c.activation == "swiglu" else {}
        flops.update(up_proj=2 * d * hidden, down_proj=2 * hidden * d)
        return flops
    if char == P.MOE:
        c = config.moe
        hidden = mlp_hidden_size(d, c)
        matrices = 3 if c.activation == "swiglu" else 2
        return {"router": 2 * d * c.n_experts, "experts": c.top_k * matrices * 2 * d * hidden}
    if char == P.HYENA:
        c = config.hyena
        inner = (c.order + 1) * d
        channels = (c.order - 1) * d
        width = c.filter_order
        filter_per_position = 2 * (c.filter_emb_dim * width + c.filter_layers * width * width + width * channels)
        # Per channel and sequence: rfft of the input, irfft of the product (both n = 2L points), the
        # filter's rfft (once per forward, shared by the batch), L + 1 complex products (6 FLOPs each);
        # per token also the skip term's multiply-add.
        fft_size = 2 * seq_len
        per_sequence = 2 * _fft_flops(fft_size) + _fft_flops(fft_size) / batch_size + 6 * (seq_len + 1)
        per_channel = per_sequence / seq_len + 2
        return {
            "in_proj": 2 * d * inner,
            "short_filter": 2 * inner * c.short_filter_order,
            "filter_fn": filter_per_position / batch_size,
            "fft_conv": channels * per_channel,
            "gates": c.order * d,  # order - 1 gates before the convolutions, one after
            "out_proj": 2 * d * d,
        }
    if char == P.S4D:
        c = config.s4d
        # The kernel (d * d_state modes at every position, ~8 FLOPs per complex multiply-add and
        # exponential, once per forward and shared by the batch), then an FFT convolution per channel
        # as Hyena's, the D skip, and the output projection.
        fft_size = 2 * seq_len
        per_sequence = 2 * _fft_flops(fft_size) + _fft_flops(fft_size) / batch_size + 6 * (seq_len + 1)
        return {
            "kernel": 8 * d * c.d_state / batch_size,
            "fft_conv": d * (per_sequence / seq_len + 2),
            "out_proj": 2 * d * (2 * d if c.glu else d),
        }
    P.validate_pattern(char)
    raise AssertionError(f"no FLOP rule for block {char!r}")


@dataclass
class FlopsBreakdown:
    """Forward FLOPs per token: per block (by component), the LM head, the totals."""

    seq_len: int
    per_layer: list[dict[str, float]]
    lm_head: float
    forward: float  # per token, forward
    training: float  # per token, forward + backward (3x forward)
    by_type: dict[str, float] = field(default_factory=dict)  # block char -> forward FLOPs over those blocks

    def summary(self) -> str:
        parts = ", ".join(f"{char!r}: {flops / self.forward:.1%}" for char, flops in self.by_type.items())
        return (f"seq_len {self.seq_len}: forward {self.forward:.4g} FLOPs/token, training {self.training:.4g} "
                f"FLOPs/token (blocks {parts}; lm_head {self.lm_head / self.forward:.1%})")


def flops_breakdown(config: ModelConfig, seq_len: int, batch_size: int = 1) -> FlopsBreakdown:
    """Forward and training FLOPs per token of ``CausalLM(config)`` on sequences of ``seq_len``."""
    per_layer = [layer_flops(char, config, seq_len, batch_size) for char in config.pattern]
    lm_head = 2 * config.d_model * config.padded_vocab_size
    by_type: dict[str, float] = {}
    for char, flops in zip(config.pattern, per_layer):
        by_type[char] = by_type.get(char, 0.0) + sum(flops.values())
    forward = sum(by_type.values()) + lm_head
    return FlopsBreakdown(seq_len=seq_len, per_layer=per_layer, lm_head=lm_head, forward=forward,
                          training=3 * forward, by_type=by_type)


def forward_flops_per_token(config: ModelConfig, seq_len: int, batch_size: int = 1) -> float:
    """Forward FLOPs per token (see :func:`flops_breakdown`)."""
    return flops_breakdown(config, seq_len, batch_size).forward


def training_flops_per_token(config: ModelConfig, seq_len: int, batch_size: int = 1) -> float:
    """Training FLOPs per token, forward + backward = 3x forward (see the module docstring)."""
    return flops_breakdown(config, seq_len, batch_size).training


# --------------------------------------------------------------------------------------------------
# Inference cache
# --------------------------------------------------------------------------------------------------

CACHE_KINDS = ("kv", "kv_mask", "conv_state", "ssm_state", "hyena_history")


def _complex_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The S4D state's dtype for a cache in ``dtype``: complex64, or complex128 for a float64 cache (as
    the mixer allocates it; the Mamba states' real dtype is ``core.cache.ssm_state_dtype_for``)."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def layer_cache_bytes(char: str, config: ModelConfig, seqlen: int, batch: int = 1,
                      dtype: torch.dtype = torch.bfloat16,
                      ssm_state_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of one ``char`` block's cache by kind (:data:`CACHE_KINDS`; absent kinds are omitted, MLP
    and MoE blocks have none), for ``batch`` sequences of up to ``seqlen`` tokens in ``dtype``; the Mamba
    states in ``ssm_state_dtype`` (``core.cache.ssm_state_dtype_for``: float32 by default)."""
    d = config.d_model
    size = dtype.itemsize
    state_complex = _complex_state_dtype(dtype)
    state_real = ssm_state_dtype_for(dtype, ssm_state_dtype)
    if char == P.MAMBA1:
        c = config.mamba1
        d_inner = c.expand * d
        return {"conv_state": batch * d_inner * (c.d_conv - 1) * size,
                "ssm_state": batch * d_inner * c.d_state * state_real.itemsize}
    if char == P.MAMBA2:
        c = config.mamba2
        dims = mamba2_dims(config)
        return {"conv_state": batch * dims["conv_dim"] * (c.d_conv - 1) * size,
                "ssm_state": batch * dims["nheads"] * c.headdim * c.d_state * state_real.itemsize}
    if char == P.ATTENTION:
        _, n_kv, head_dim = attention_dims(config)
        return {"kv": 2 * batch * n_kv * seqlen * head_dim * size,
                "kv_mask": batch * seqlen * torch.bool.itemsize}
    if char == P.HYENA:
        c = config.hyena
        return {"conv_state": batch * (c.order + 1) * d * (c.short_filter_order - 1) * size,
                "hyena_history": (c.order - 1) * batch * d * seqlen * size}
    if char == P.S4D:
        return {"ssm_state": batch * d * config.s4d.d_state * state_complex.itemsize}
    if char in (P.MLP, P.MOE):
        return {}
    P.validate_pattern(char)
    raise AssertionError(f"no cache rule for block {char!r}")


@dataclass
class CacheBytes:
    """An inference cache's size by kind (see the module docstring), for ``batch`` sequences."""

    seqlen: int
    batch: int
    dtype: torch.dtype
    by_kind: dict[str, int]  # every kind of CACHE_KINDS, 0 when the model has none
    per_layer: list[dict[str, int]] = field(default_factory=list)  # layer_cache_bytes of each block

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def kv(self) -> int:
        """Keys and values only: what a KV-cache table counts."""
        return self.by_kind["kv"]

    @property
    def state(self) -> int:
        """The fixed-size recurrent part (conv and SSM states), independent of ``seqlen``."""
        return self.by_kind["conv_state"] + self.by_kind["ssm_state"]

    def per_sequence(self) -> float:
        return self.total / self.batch


def cache_bytes(config: ModelConfig, *, seqlen: int, batch: int = 1,
                dtype: torch.dtype = torch.bfloat16, ssm_state_dtype: torch.dtype | None = None) -> CacheBytes:
    """Bytes of ``CausalLM(config).allocate_cache(batch, seqlen, dtype=dtype, ssm_state_dtype=...)``, by
    kind and by block.

    Computed from the config alone (no tensor is allocated), so it is available for any size. Hyena's
    cache cannot actually be allocated beyond ``config.hyena.max_seqlen`` (its filter length); the
    formula still says what it would take.
    """
    if seqlen < 1 or batch < 1:
        raise ValueError(f"cache_bytes needs seqlen >= 1 and batch >= 1, got seqlen={seqlen}, batch={batch}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"cache_bytes: dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    per_layer = [layer_cache_bytes(char, config, seqlen, batch, dtype, ssm_state_dtype) for char in config.pattern]
    by_kind = dict.fromkeys(CACHE_KINDS, 0)
    for layer in per_layer:
        for kind, n in layer.items():
            by_kind[kind] += n
    return CacheBytes(seqlen=seqlen, batch=batch, dtype=dtype, by_kind=by_kind, per_layer=per_layer)


# --------------------------------------------------------------------------------------------------
# Reference shapes: the models of the Jamba paper's KV-cache table (not training presets)
# --------------------------------------------------------------------------------------------------

def _llama_like(name: str, n_layers: int, n_kv_heads: int, ffn_hidden: int, rope_theta: float,
                moe: MoEConfig | None = None) -> ModelConfig:
    """A Llama-family decoder (d_model 4096, 32 heads of 128, SwiGLU, RMSNorm, RoPE, untied, vocab
    32000): attention and MLP (or MoE) blocks alternate, each pre-norm, as ``LlamaDecoderLayer``."""
    return ModelConfig(
        name=name,
        d_model=4096,
        pattern=("*E" if moe is not None else "*-") * n_layers,
        vocab_size=32000,
        pad_vocab_size_multiple=1,
        tie_embeddings=False,
        norm_eps=1e-5,
        attention=AttentionConfig(n_heads=32, n_kv_heads=n_kv_heads, rope=True, rope_theta=rope_theta),
        mlp=MLPConfig(activation="swiglu", hidden_size=ffn_hidden),
        moe=moe or MoEConfig(),
    )


def llama2_7b() -> ModelConfig:
    """Llama-2 7B (Touvron et al. 2023; HF ``meta-llama/Llama-2-7b-hf``): 32 layers, MHA (32 KV heads),
    SwiGLU 11008; 6,738,415,616 parameters."""
    return _llama_like("llama-2-7b", 32, n_kv_heads=32, ffn_hidden=11008, rope_theta=10000.0)


def mistral_7b() -> ModelConfig:
    """Mistral 7B v0.1 (Jiang et al. 2023): 32 layers, GQA with 8 KV heads, SwiGLU 14336; 7.24B
    parameters. Its 4096-token sliding window is not modelled: the cache here (and in the Jamba
    paper's table) holds every position."""
    return _llama_like("mistral-7b", 32, n_kv_heads=8, ffn_hidden=14336, rope_theta=10000.0)


def mixtral_8x7b() -> ModelConfig:
    """Mixtral 8x7B (Jiang et al. 2024): Mistral's attention, 8 SwiGLU experts of 14336, top-2 with
    renormalized weights; 46.7B parameters, 12.9B active."""
    moe = MoEConfig(n_experts=8, top_k=2, hidden_size=14336, activation="swiglu", renormalize=True,
                    load_balancing_coef=0.001, z_loss_coef=0.0)
    return _llama_like("mixtral-8x7b", 32, n_kv_heads=8, ffn_hidden=14336, rope_theta=1e6, moe=moe)


REFERENCE_CONFIGS = {"llama-2-7b": llama2_7b, "mistral-7b": mistral_7b, "mixtral-8x7b": mixtral_8x7b}


def presets_table(names: list[str] | None = None, seq_len: int = 2048) -> str:
    """A text table of presets: parameters (total, non-embedding, active) and training FLOPs per token."""
    from core.presets import PRESETS, get_preset

    rows = [f"{'preset':<20} {'total':>16} {'non-embedding':>16} {'active':>16} {'train FLOPs/tok':>16}"]
    for name in names or list(PRESETS):
        config = get_preset(name)
        params = count_parameters(config)
        rows.append(f"{name:<20} {params.total:>16,} {params.non_embedding:>16,} {params.active:>16,} "
                    f"{training_flops_per_token(config, seq_len):>16.4g}")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Parameter and FLOP counts of the named presets.")
    parser.add_argument("presets", nargs="*", help="preset names (default: all)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for the FLOPs (default 2048)")
    args = parser.parse_args()
    print(presets_table(args.presets or None, args.seq_len))
