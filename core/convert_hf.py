"""Checkpoint interop: HF transformers' Mamba, Mamba-2, Jamba and Llama (both ways), and mamba_ssm.

Our blocks are one pre-norm residual each (``x + mixer(norm(x))``), one character of the pattern a
block. The external layouts map onto them as follows (``i`` an external layer, ``k`` our block):

=================  ==========================================  =================================
source             one external layer                          our blocks
=================  ==========================================  =================================
HF ``mamba``       ``backbone.layers.i.{norm,mixer}``          ``S``            (k = i)
HF ``mamba2``      ``backbone.layers.i.{norm,mixer}``          ``M``            (k = i)
HF ``jamba``       ``input_layernorm`` + ``mamba``/``self_attn``  ``S`` or ``*``  (k = 2i)
                   ``pre_ff_layernorm`` + ``feed_forward``      ``-`` or ``E``   (k = 2i + 1)
HF ``llama``       ``input_layernorm`` + ``self_attn``           ``*`` (RoPE)     (k = 2i)
                   ``post_attention_layernorm`` + ``mlp``        ``-``            (k = 2i + 1)
mamba_ssm          ``norm`` + ``mixer`` [+ ``norm2`` + ``mlp``]   ``S``/``M``/``*`` [+ ``-``]
=================  ==========================================  =================================

The mixers keep mamba_ssm's and Llama's parameter names (docs/architecture.md), so most tensors map by
renaming only. The exceptions, each handled here:

- HF Mamba / Mamba-2 call the embedding ``backbone.embeddings`` (we and mamba_ssm: ``embedding``).
- Jamba's experts: transformers 5.x holds them fused in memory, ``experts.gate_up_proj`` [E, 2I, H]
  (gate rows first) and ``experts.down_proj`` [E, H, I], but saves them per expert
  (``experts.{e}.gate_proj.weight`` [I, H], ...), as 4.x held them. We read both and write whichever
  the installed transformers' model holds. The router (``feed_forward.router.weight`` [E, H]) takes a
  softmax over all experts and keeps the top-k probabilities *without* renormalizing them, which is our
  ``MoEConfig(renormalize=False)``.
- mamba_ssm's attention (``MHA``) fuses q, k, v into ``in_proj`` (rows q, then k, then v) and may use
  interleaved rotary pairs; its ``GatedMLP`` fuses ``fc1 = [up; gate]`` (``y, gate = fc1(x).chunk(2)``,
  ``y * silu(gate)``) and calls the down projection ``fc2``.
- Vocabulary padding: our embedding has ``padded_vocab_size`` rows and the logits keep the first
  ``vocab_size``. HF models have exactly ``vocab_size`` rows, so an import sets
  ``pad_vocab_size_multiple=1`` and an export drops the padding rows (never a real token's row).

Conventions checked against transformers' 5.x code (4.x differs in Jamba's in-memory experts and
Llama's ``rope_theta`` spelling, both handled): all norms are RMSNorm with
the weight applied after the float32 normalization; Mamba-2's gated norm is ``rms(y * silu(z)) * w``
over groups of ``d_inner / n_groups`` (our ``norm_before_gate=False``) with ``layer_norm_epsilon``; Jamba's
Mamba has RMSNorms on dt, B and C after ``x_proj`` (``inner_norms``) with ``rms_norm_eps`` and its
attention has no positional encoding; Llama's RoPE is rotate-half with ``rope_theta`` (our convention).

Reading a folder does not need transformers: :data:`HF_DEFAULTS` fills what a config.json leaves out
(a test checks it against transformers' classes). Building an HF model (:func:`to_hf`) does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from core import pattern as P
from core.config import (
    AttentionConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)

HF_FAMILIES = ("mamba", "mamba2", "jamba", "llama")
HF_CLASSES = {
    "mamba": ("MambaConfig", "MambaForCausalLM"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM"),
    "jamba": ("JambaConfig", "JambaForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

# transformers' class defaults for the keys we read: an HF config.json written by an older version may
# leave defaults out. tests/core/test_convert_hf.py checks these against the installed classes.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba": {
        "vocab_size": 50280, "hidden_size": 768, "state_size": 16, "num_hidden_layers": 32,
        "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "hidden_act": "silu", "residual_in_fp32": True, "time_step_rank": "auto", "time_step_scale": 1.0,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_init_scheme": "random",
        "time_step_floor": 1e-4, "rescale_prenorm_residual": False, "tie_word_embeddings": True,
    },
    "mamba2": {
        "num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
        "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8,
        "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
        "time_step_limit": (0.0, math.inf), "rescale_prenorm_residual": False, "chunk_size": 256,
        "tie_word_embeddings": False,
    },
    "jamba": {
        "vocab_size": 65536, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
        "num_experts_per_tok": 2, "num_experts": 16, "expert_layer_period": 2, "expert_layer_offset": 1,
        "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4,
        "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False,
    },
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "head_dim": None,
    },
}
# Llama's default RoPE base when a config names none (transformers' default_theta).
LLAMA_DEFAULT_ROPE_THETA = 10000.0


class ConversionError(ValueError):
    """A model or checkpoint that the other side cannot express (the message says what and why)."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _as_float(value: Any) -> float:
    """A float from a JSON value, accepting the spellings of infinity that configs use."""
    if isinstance(value, Mapping) and "__float__" in value:  # transformers 5.x's JSON for non-finite floats
        value = value["__float__"]
    if isinstance(value, str):
        return float(value.replace("Infinity", "inf"))
    return float(value)


def _hf_dict(hf_config: Any) -> dict[str, Any]:
    """An HF config (a PretrainedConfig or its dict / config.json) as a dict with defaults filled."""
    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    family = data.get("model_type")
    if family not in HF_FAMILIES:
        raise ConversionError(
            f"HF model_type {family!r} is not supported; supported: {list(HF_FAMILIES)} "
            "(MambaForCausalLM, Mamba2ForCausalLM, JambaForCausalLM, LlamaForCausalLM)"
        )
    return {**HF_DEFAULTS[family], **data}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _period_offset(flags: list[bool], what: str) -> tuple[int, int]:
    """The smallest (period, offset), offset < period, with ``flags[i] == (i % period == offset)``."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    where = [i for i, flag in enumerate(flags) if flag]
    raise ConversionError(
        f"JambaConfig places {what} layers at i % period == offset; the {what} layers at Jamba layers "
        f"{where} (of {n}) follow no such rule, so HF Jamba cannot hold this pattern"
    )


def _stack(parts: dict[int, torch.Tensor], where: str) -> torch.Tensor:
    if sorted(parts) != list(range(len(parts))):
        raise ConversionError(f"{where}: experts {sorted(parts)} are not numbered 0..{len(parts) - 1}")
    return torch.stack([parts[e] for e in range(len(parts))])


def _interleaved_to_half(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a q / k projection [n_heads * head_dim, ...] from interleaved rotary pairs
    (features 2j, 2j+1 rotate together) to rotate-half (features j, j + head_dim/2 rotate together)."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    shaped = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    return shaped[:, order].reshape(weight.shape)


# --------------------------------------------------------------------------------------------------
# Configs: HF -> ours
# --------------------------------------------------------------------------------------------------

def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our :class:`ModelConfig` for an HF config (a ``PretrainedConfig`` or a config.json dict).

    Raises :class:`ConversionError` for a model_type other than mamba / mamba2 / jamba / llama and for
    options our mixers lack (another activation, scaled RoPE, Mamba-2 without its gated norm, ...).
    """
    c = _hf_dict(hf_config)
    family = c["model_type"]
    _require(c["hidden_act"] in ("silu", "swish"),
             f"HF {family}: hidden_act={c['hidden_act']!r}; our Mamba layers and SwiGLU MLPs use silu only")
    d_model = int(c["hidden_size"])
    n = int(c["num_hidden_layers"])
    common = dict(d_model=d_model, vocab_size=int(c["vocab_size"]), pad_vocab_size_multiple=1,
                  tie_embeddings=bool(c["tie_word_embeddings"]), domain="lm")

    if family == "mamba":
        dt_rank = c["time_step_rank"]
        return ModelConfig(
            pattern=P.MAMBA1 * n, norm_eps=float(c["layer_norm_epsilon"]),
            residual_in_fp32=bool(c["residual_in_fp32"]),
            rescale_prenorm_residual=bool(c["rescale_prenorm_residual"]),
            mamba1=Mamba1Config(
                d_state=int(c["state_size"]), d_conv=int(c["conv_kernel"]), expand=int(c["expand"]),
                dt_rank=None if dt_rank == "auto" else int(dt_rank), dt_min=float(c["time_step_min"]),
                dt_max=float(c["time_step_max"]), dt_init=c["time_step_init_scheme"],
                dt_scale=float(c["time_step_scale"]), dt_init_floor=float(c["time_step_floor"]),
                conv_bias=bool(c["use_conv_bias"]), bias=bool(c["use_bias"]),
            ),
            **common,
        )

    if family == "mamba2":
        _require(c.get("rms_norm", True), "HF mamba2 with rms_norm=False (no gated norm) is not supported: "
                                          "our Mamba-2 always has its gated RMSNorm")
        expand, headdim, nheads = int(c["expand"]), int(c["head_dim"]), int(c["num_heads"])
        _require(expand * d_model == nheads * headdim,
                 f"HF mamba2: num_heads * head_dim = {nheads} * {headdim} must equal expand * hidden_size = "
                 f"{expand} * {d_model}")
        low, high = (_as_float(v) for v in c["time_step_limit"])
        return ModelConfig(
            pattern=P.MAMBA2 * n, norm_eps=float(c["layer_norm_epsilon"]),
            residual_in_fp32=bool(c["residual_in_fp32"]),
            rescale_prenorm_residual=bool(c["rescale_prenorm_residual"]),
            mamba2=Mamba2Config(
                d_state=int(c["state_size"]), d_conv=int(c["conv_kernel"]), expand=expand, headdim=headdim,
                ngroups=int(c["n_groups"]), chunk_size=int(c["chunk_size"]), dt_min=float(c["time_step_min"]),
                dt_max=float(c["time_step_max"]), dt_init_floor=float(c["time_step_floor"]),
                dt_limit_min=low, dt_limit_max=high, conv_bias=bool(c["use_conv_bias"]),
                bias=bool(c["use_bias"]), norm_before_gate=False, D_has_hdim=False,
            ),
            **common,
        )

    n_heads = int(c["num_attention_heads"])
    n_kv = c["num_key_value_heads"]
    n_kv = n_heads if n_kv is None else int(n_kv)
    hidden = int(c["intermediate_size"])

    if family == "jamba":
        attn_period, attn_offset = int(c["attn_layer_period"]), int(c["attn_layer_offset"])
        expert_period, expert_offset = int(c["expert_layer_period"]), int(c["expert_layer_offset"])
        n_experts = int(c["num_experts"])
        blocks = []
        for i in range(n):
            blocks.append(P.ATTENTION if i % attn_period == attn_offset else P.MAMBA1)
            # HF builds an MLP where its layers_num_experts says 1 expert.
            moe = n_experts > 1 and i % expert_period == expert_offset
            blocks.append(P.MOE if moe else P.MLP)
        dt_rank = c["mamba_dt_rank"]
        return ModelConfig(
            pattern="".join(blocks), norm_eps=float(c["rms_norm_eps"]), residual_in_fp32=False,
            initializer_range=float(c["initializer_range"]),
            mamba1=Mamba1Config(
                d_state=int(c["mamba_d_state"]), d_conv=int(c["mamba_d_conv"]), expand=int(c["mamba_expand"]),
                dt_rank=None if dt_rank == "auto" else int(dt_rank), conv_bias=bool(c["mamba_conv_bias"]),
                bias=bool(c["mamba_proj_bias"]), inner_norms=True,
            ),
            # Jamba's attention: head_dim = hidden_size // num_attention_heads, no bias, no RoPE.
            attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv, rope=False),
            mlp=MLPConfig(hidden_size=hidden, activation="swiglu"),
            moe=MoEConfig(n_experts=n_experts, top_k=int(c["num_experts_per_tok"]), hidden_size=hidden,
                          activation="swiglu", renormalize=False, capacity_factor=None,
                          load_balancing_coef=float(c["router_aux_loss_coef"]), z_loss_coef=0.0),
            **common,
        )

    # llama
    theta = _llama_rope_theta(c)
    head_dim = c["head_dim"]
    head_dim = d_model // n_heads if head_dim is None else int(head_dim)
    bias = bool(c["attention_bias"])
    return ModelConfig(
        pattern=(P.ATTENTION + P.MLP) * n, norm_eps=float(c["rms_norm_eps"]), residual_in_fp32=False,
        initializer_range=float(c["initializer_range"]), rescale_prenorm_residual=False,
        attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv,
                                  head_dim=None if head_dim * n_heads == d_model else head_dim,
                                  rope=True, rope_theta=theta, qkv_bias=bias, out_bias=bias),
        mlp=MLPConfig(hidden_size=hidden, activation="swiglu", bias=bool(c["mlp_bias"])),
        **common,
    )


def _llama_rope_theta(c: dict[str, Any]) -> float:
    """rope_theta of a Llama config, 5.x (``rope_parameters``) or 4.x (``rope_theta``, ``rope_scaling``)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    _require(rope_type == "default",
             f"HF llama: RoPE type {rope_type!r} (scaled RoPE) is not supported: our attention implements "
             "plain RoPE only (rope_type 'default')")
    theta = params.get("rope_theta", c.get("rope_theta", LLAMA_DEFAULT_ROPE_THETA))
    return float(theta)


# --------------------------------------------------------------------------------------------------
# Configs: ours -> HF
# --------------------------------------------------------------------------------------------------

def hf_family(config: ModelConfig) -> str:
    """Which HF family can hold ``config`` ('mamba', 'mamba2', 'jamba' or 'llama'), or a
    :class:`ConversionError` that says why none can."""
    pattern = config.pattern
    used = set(pattern)
    if used == {P.MAMBA1}:
        _require(not config.mamba1.inner_norms,
                 "HF Mamba has no inner norms (mamba1.inner_norms=True), and Jamba layers need an FFN after "
                 "each mixer ('S-' / 'SE' pairs); this pattern has no HF equivalent")
        return "mamba"
    if used == {P.MAMBA2}:
        return "mamba2"
    pairs = [pattern[k:k + 2] for k in range(0, len(pattern), 2)]
    paired = len(pattern) % 2 == 0 and all(
        p[0] in (P.MAMBA1, P.ATTENTION) and p[1] in (P.MLP, P.MOE) for p in pairs
    )
    if paired and used <= {P.ATTENTION, P.MLP} and config.attention.rope:
        return "llama"
    if paired:
        return "jamba"
    names = {c: P.LAYER_TYPES[c][0] for c in sorted(used)}
    raise ConversionError(
        f"pattern {pattern!r} ({names}) has no HF transformers equivalent. HF can hold: all 'S' "
        "(MambaForCausalLM), all 'M' (Mamba2ForCausalLM), '*-' repeated with RoPE (LlamaForCausalLM), "
        "and pairs of a mixer in {'S', '*'} followed by an FFN in {'-', 'E'} (JambaForCausalLM). "
        "Mamba-2 cannot be mixed with other blocks, and Hyena has no HF model."
    )


def config_to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The HF config (as ``{"model_type": ..., **kwargs}``) that holds ``config``; raises
    :class:`ConversionError` naming the option HF lacks."""
    family = hf_family(config)
    n = config.n_layers
    d_model = config.d_model
    common = dict(vocab_size=config.vocab_size, hidden_size=d_model, tie_word_embeddings=config.tie_embeddings)
    fam = f"HF {family}"

    if family == "mamba":
        c = config.mamba1
        _require(not c.inner_norms, f"{fam}: HF Mamba has no inner norms (mamba1.inner_norms)")
        return dict(
            model_type="mamba", num_hidden_layers=n, state_size=c.d_state, conv_kernel=c.d_conv,
            expand=c.expand, time_step_rank="auto" if c.dt_rank is None else c.dt_rank,
            time_step_min=c.dt_min, time_step_max=c.dt_max, time_step_init_scheme=c.dt_init,
            time_step_scale=c.dt_scale, time_step_floor=c.dt_init_floor, use_conv_bias=c.conv_bias,
            use_bias=c.bias, layer_norm_epsilon=config.norm_eps, residual_in_fp32=config.residual_in_fp32,
            rescale_prenorm_residual=config.rescale_prenorm_residual, hidden_act="silu", **common,
        )

    if family == "mamba2":
        c = config.mamba2
        _require(not c.norm_before_gate, f"{fam}: HF Mamba-2's gated norm is rms(y * silu(z)) "
                                         "(norm_before_gate=False); norm_before_gate=True has no equivalent")
        _require(not c.D_has_hdim, f"{fam}: HF Mamba-2 has D per head; mamba2.D_has_hdim=True has no equivalent")
        d_inner = c.expand * d_model
        return dict(
            model_type="mamba2", num_hidden_layers=n, num_heads=d_inner // c.headdim, head_dim=c.headdim,
            state_size=c.d_state, conv_kernel=c.d_conv, expand=c.expand, n_groups=c.ngroups,
            chunk_size=c.chunk_size, time_step_min=c.dt_min, time_step_max=c.dt_max,
            time_step_floor=c.dt_init_floor, time_step_limit=(c.dt_limit_min, c.dt_limit_max),
            use_conv_bias=c.conv_bias, use_bias=c.bias, layer_norm_epsilon=config.norm_eps,
            residual_in_fp32=config.residual_in_fp32,
            rescale_prenorm_residual=config.rescale_prenorm_residual, hidden_act="silu", **common,
        )

    a = config.attention
    used = set(config.pattern)
    n_pairs = n // 2
    if P.MLP in used and P.MOE in used:
        hidden_mlp, hidden_moe = _ffn_hidden(config, "mlp"), _ffn_hidden(config, "moe")
        _require(hidden_mlp == hidden_moe,
                 f"{fam}: one intermediate_size serves MLPs and experts; mlp and moe hidden sizes differ "
                 f"({hidden_mlp} vs {hidden_moe})")
    if P.MLP in used:
        m = config.mlp
        _require(m.activation == "swiglu", f"{fam}: MLPs are SwiGLU; mlp.activation={m.activation!r} has no equivalent")
        hidden = _ffn_hidden(config, "mlp")
    else:
        hidden = _ffn_hidden(config, "moe")
    if P.ATTENTION in used:
        n_kv = a.n_heads if a.n_kv_heads is None else a.n_kv_heads
        head_dim = d_model // a.n_heads if a.head_dim is None else a.head_dim

    if family == "llama":
        _require(a.qkv_bias == a.out_bias,
                 f"{fam}: attention_bias covers q, k, v and o together; qkv_bias={a.qkv_bias} and "
                 f"out_bias={a.out_bias} differ")
        return dict(
            model_type="llama", num_hidden_layers=n_pairs, intermediate_size=hidden, num_attention_heads=a.n_heads,
            num_key_value_heads=n_kv, head_dim=head_dim, rope_theta=a.rope_theta, attention_bias=a.qkv_bias,
            mlp_bias=config.mlp.bias, rms_norm_eps=config.norm_eps, hidden_act="silu",
            initializer_range=config.initializer_range, **common,
        )

    # jamba
    mixers = [config.pattern[2 * i] for i in range(n_pairs)]
    ffns = [config.pattern[2 * i + 1] for i in range(n_pairs)]
    attn_period, attn_offset = _period_offset([m == P.ATTENTION for m in mixers], "attention")
    expert_period, expert_offset = _period_offset([f == P.MOE for f in ffns], "expert (MoE)")
    out = dict(
        model_type="jamba", num_hidden_layers=n_pairs, intermediate_size=hidden,
        attn_layer_period=attn_period, attn_layer_offset=attn_offset, expert_layer_period=expert_period,
        expert_layer_offset=expert_offset, rms_norm_eps=config.norm_eps, hidden_act="silu",
        initializer_range=config.initializer_range, **common,
    )
    if P.MAMBA1 in used:
        c = config.mamba1
        _require(c.inner_norms, f"{fam}: Jamba's Mamba layers have RMSNorms on dt, B and C; set "
                                "mamba1.inner_norms=True (a plain Mamba-1 hybrid has no HF equivalent)")
        out.update(mamba_d_state=c.d_state, mamba_d_conv=c.d_conv, mamba_expand=c.expand,
                   mamba_dt_rank="auto" if c.dt_rank is None else c.dt_rank, mamba_conv_bias=c.conv_bias,
                   mamba_proj_bias=c.bias)
    if P.ATTENTION in used:
        _require(not a.rope, f"{fam}: Jamba's attention has no positional encoding; attention.rope=True "
                             "has no equivalent")
        _require(not (a.qkv_bias or a.out_bias), f"{fam}: Jamba's attention projections have no bias")
        _require(head_dim * a.n_heads == d_model,
                 f"{fam}: Jamba's head_dim is hidden_size // num_attention_heads; attention.head_dim="
                 f"{a.head_dim} differs")
        out.update(num_attention_heads=a.n_heads, num_key_value_heads=n_kv)
    if P.MLP in used:
        _require(not config.mlp.bias, f"{fam}: Jamba's MLPs have no bias")
    if P.MOE in used:
        e = config.moe
        _require(e.activation == "swiglu", f"{fam}: Jamba's experts are SwiGLU; moe.activation={e.activation!r}")
        _require(not e.renormalize, f"{fam}: Jamba keeps the top-k router probabilities unnormalized; "
                                    "moe.renormalize=True has no equivalent")
        _require(e.capacity_factor is None, f"{fam}: Jamba's MoE is dropless; moe.capacity_factor="
                                            f"{e.capacity_factor} has no equivalent")
        _require(e.n_experts > 1, f"{fam}: HF Jamba builds an MLP where num_experts == 1; use '-' instead of 'E'")
        out.update(num_experts=e.n_experts, num_experts_per_tok=e.top_k, router_aux_loss_coef=e.load_balancing_coef)
    else:
        # No expert layer: any num_experts > 1 (the period rule never fires); keep ours for a round trip.
        out.update(num_experts=max(config.moe.n_experts, 2), num_experts_per_tok=min(config.moe.top_k, 2))
    return out


def _ffn_hidden(config: ModelConfig, which: str) -> int:
    from core.layers.mlp import mlp_hidden_size

    return mlp_hidden_size(config.d_model, getattr(config, which))


def config_to_hf(config: ModelConfig) -> Any:
    """The transformers ``PretrainedConfig`` that holds ``config`` (needs transformers installed)."""
    transformers = _transformers()
    kwargs = config_to_hf_dict(config)
    family = kwargs.pop("model_type")
    cls = getattr(transformers, HF_CLASSES[family][0])
    if family == "llama":
        theta = kwargs.pop("rope_theta")
        fields = getattr(cls, "__dataclass_fields__", {})
        if "rope_parameters" in fields:  # transformers 5.x
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        else:
            kwargs["rope_theta"] = theta
    if family == "mamba2":
        kwargs["time_step_limit"] = list(kwargs["time_step_limit"])
    return cls(**kwargs)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # an optional dependency: only the HF model classes need it
        raise ImportError("converting to / from a transformers model needs transformers: "
                          "pip install 'transformers>=4.46'") from error
    return transformers


# --------------------------------------------------------------------------------------------------
# State dicts: HF -> ours
# --------------------------------------------------------------------------------------------------

# HF keys that carry no weights of the model (recomputed buffers older versions saved).
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def state_dict_from_hf(hf_config: Any, state_dict: Mapping[str, torch.Tensor],
                       config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict from an HF one (in-memory or saved layout; Jamba's experts fused or per expert).

    The tied ``lm_head.weight`` is left out when ``config.tie_embeddings``. Keys that map to nothing
    raise :class:`ConversionError`; missing keys are reported when the state dict is loaded.
    """
    c = _hf_dict(hf_config)
    config = config_from_hf(c) if config is None else config
    family = c["model_type"]
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (our block, proj) -> {expert: [.., ..]}
    for key, tensor in state_dict.items():
        if _IGNORED_HF_KEYS.fullmatch(key):
            continue
        if key == "lm_head.weight":
            out[key] = tensor
            continue
        if family in ("mamba", "mamba2"):
            match = re.fullmatch(r"backbone\.(embeddings?|norm_f)\.(.+)", key)
            if match:
                name = "embedding" if match[1].startswith("embedding") else "norm_f"
                out[f"backbone.{name}.{match[2]}"] = tensor
            elif re.fullmatch(r"backbone\.layers\.\d+\.(norm|mixer)\..+", key):
                out[key] = tensor
            else:
                unmapped.append(key)
            continue
        if key == "model.embed_tokens.weight":
            out["backbone.embedding.weight"] = tensor
            continue
        if key in ("model.norm.weight", "model.final_layernorm.weight"):
            out["backbone.norm_f.weight"] = tensor
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key)
        if match is None:
            unmapped.append(key)
            continue
        i, part, rest = int(match[1]), match[2], match[3]
        mixer, ffn = f"backbone.layers.{2 * i}", f"backbone.layers.{2 * i + 1}"
        if part == "input_layernorm":
            out[f"{mixer}.norm.{rest}"] = tensor
        elif part in ("self_attn", "mamba"):
            out[f"{mixer}.mixer.{rest}"] = tensor
        elif part in ("post_attention_layernorm", "pre_ff_layernorm"):
            out[f"{ffn}.norm.{rest}"] = tensor
        elif part in ("mlp", "feed_forward"):
            per_expert = re.fullmatch(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest)
            if rest == "experts.gate_up_proj":  # transformers 5.x in memory: [E, 2I, H], gate rows first
                gate, up = tensor.chunk(2, dim=1)
                out[f"{ffn}.mixer.experts.gate_proj"] = gate
                out[f"{ffn}.mixer.experts.up_proj"] = up
            elif rest == "experts.down_proj":
                out[f"{ffn}.mixer.experts.down_proj"] = tensor
            elif per_expert:  # saved layout (and 4.x in memory): one Linear per expert
                experts.setdefault((2 * i + 1, per_expert[2]), {})[int(per_expert[1])] = tensor
            else:  # MLP projections, the router
                out[f"{ffn}.mixer.{rest}"] = tensor
        else:
            unmapped.append(key)
    for (block, proj), parts in experts.items():
        out[f"backbone.layers.{block}.mixer.experts.{proj}"] = _stack(parts, f"HF Jamba layer {(block - 1) // 2}")
    if unmapped:
        raise ConversionError(f"HF {family} state dict has keys that map to no parameter of ours: "
                              f"{_head(unmapped)}")
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _head(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------
# State dicts: ours -> HF
# --------------------------------------------------------------------------------------------------

def state_dict_to_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """The HF state dict of our model: the saved layout (Jamba experts one Linear each), or
    transformers 5.x's in-memory layout (``experts.gate_up_proj``) with ``fused_experts``.

    The embedding and head drop the vocabulary padding rows; ``lm_head.weight`` is always present (the
    embedding when tied), as HF's own state dicts list it.
    """
    family = hf_family(config)
    vocab = config.vocab_size
    out: dict[str, torch.Tensor] = {}
    embedding = state_dict["backbone.embedding.weight"][:vocab]
    head = embedding if config.tie_embeddings else state_dict["lm_head.weight"][:vocab]
    if family in ("mamba", "mamba2"):
        out["backbone.embeddings.weight"] = embedding
        for key, tensor in state_dict.items():
            if key.startswith(("backbone.layers.", "backbone.norm_f.")):
                out[key] = tensor
        out["lm_head.weight"] = head
        return out

    out["model.embed_tokens.weight"] = embedding
    final_norm = "model.norm.weight" if family == "llama" else "model.final_layernorm.weight"
    out[final_norm] = state_dict["backbone.norm_f.weight"]
    mixer_part = {P.ATTENTION: "self_attn", P.MAMBA1: "mamba"}
    ffn_norm = "post_attention_layernorm" if family == "llama" else "pre_ff_layernorm"
    ffn_part = "mlp" if family == "llama" else "feed_forward"
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"backbone\.layers\.(\d+)\.(norm|mixer)\.(.+)", key)
        if match is None:
            continue
        k, part, rest = int(match[1]), match[2], match[3]
        i = k // 2
        if k % 2 == 0:  # the sequence mixer of Jamba / Llama layer i
            target = "input_layernorm" if part == "norm" else mixer_part[config.pattern[k]]
            out[f"model.layers.{i}.{target}.{rest}"] = tensor
        elif part == "norm":
            out[f"model.layers.{i}.{ffn_norm}.{rest}"] = tensor
        elif rest.startswith("experts."):
            proj = rest.split(".", 1)[1]
            if fused_experts and proj in ("gate_proj", "up_proj"):
                if proj == "gate_proj":
                    up = state_dict[f"backbone.layers.{k}.mixer.experts.up_proj"]
                    out[f"model.layers.{i}.{ffn_part}.experts.gate_up_proj"] = torch.cat([tensor, up], dim=1)
            elif fused_experts:
                out[f"model.layers.{i}.{ffn_part}.experts.{proj}"] = tensor
            else:
                for e in range(tensor.shape[0]):
                    out[f"model.layers.{i}.{ffn_part}.experts.{e}.{proj}.weight"] = tensor[e]
        else:
            out[f"model.layers.{i}.{ffn_part}.{rest}"] = tensor
    out["lm_head.weight"] = head
    return out


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def from_hf(hf_model: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Our :class:`~core.backbone.CausalLM` with the weights of an HF ``MambaForCausalLM``,
    ``Mamba2ForCausalLM``, ``JambaForCausalLM`` or ``LlamaForCausalLM``.

    device / dtype default to the HF model's (its embedding's).
    """
    from core.checkpoint import build_model

    config = config_from_hf(hf_model.config)
    state = state_dict_from_hf(hf_model.config, hf_model.state_dict(), config)
    embedding = hf_model.get_input_embeddings().weight
    return build_model(
        config, state, device=embedding.device if device is None else device,
        dtype=embedding.dtype if dtype is None else dtype,
        source=f"HF {type(hf_model).__name__}",
    )


def to_hf(model: Any) -> Any:
    """The transformers model (eval mode, on the model's device and dtype) holding our ``model``'s
    weights; identical logits. Raises :class:`ConversionError` when HF has no model for its pattern or
    options (see :func:`hf_family`)."""
    transformers = _transformers()
    config = model.config
    hf_config = config_to_hf(config)
    cls = getattr(transformers, HF_CLASSES[hf_config.model_type][1])
    weight = model.backbone.embedding.weight
    hf_model = cls(hf_config)
    target = hf_model.state_dict()
    fused = any(key.endswith("experts.gate_up_proj") for key in target)
    state = state_dict_to_hf(config, model.state_dict(), fused_experts=fused)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ConversionError(
            f"our {hf_config.model_type} state dict does not match transformers' {cls.__name__} "
            f"(transformers {transformers.__version__}): missing {_head(missing)}; unexpected {_head(unexpected)}"
        )
    hf_model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    return hf_model.to(device=weight.device, dtype=weight.dtype).eval()


# --------------------------------------------------------------------------------------------------
# mamba_ssm (state-spaces/mamba): MambaLMHeadModel folders
# --------------------------------------------------------------------------------------------------

# MambaConfig's fields (mamba_ssm/models/config_mamba.py) and their defaults.
MAMBA_SSM_DEFAULTS: dict[str, Any] = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
    "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}
# Keys some saved configs carry that describe no part of the model.
_MAMBA_SSM_IGNORED = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                      "model_type", "initializer_cfg"}
_MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                "dt_init_floor", "conv_bias", "bias", "use_fast_path", "layer"}
_MAMBA2_KEYS = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
                "bias", "conv_bias", "chunk_size", "use_mem_eff_path", "layer"}
_MHA_KEYS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
             "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"}
GATED_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden width up to this


def is_mamba_ssm_config(data: Mapping[str, Any]) -> bool:
    return "d_model" in data and "n_layer" in data


def config_from_mamba_ssm(data: Mapping[str, Any]) -> ModelConfig:
    """Our :class:`ModelConfig` for a mamba_ssm ``MambaConfig`` (its config.json)."""
    unknown = sorted(set(data) - set(MAMBA_SSM_DEFAULTS) - _MAMBA_SSM_IGNORED)
    _require(not unknown, f"mamba_ssm config: unknown key(s) {unknown}; known: {sorted(MAMBA_SSM_DEFAULTS)}")
    c = {**MAMBA_SSM_DEFAULTS, **data}
    _require(c["rms_norm"], "mamba_ssm config: rms_norm=False (LayerNorm blocks) is not supported; our blocks "
                            "use RMSNorm")
    d_model, n = int(c["d_model"]), int(c["n_layer"])
    ssm = dict(c["ssm_cfg"] or {})
    layer = ssm.get("layer", "Mamba1")
    _require(layer in ("Mamba1", "Mamba2"), f"mamba_ssm ssm_cfg.layer={layer!r}: only Mamba1 and Mamba2 "
                                            "layers are supported")
    allowed = _MAMBA1_KEYS if layer == "Mamba1" else _MAMBA2_KEYS
    unknown = sorted(set(ssm) - allowed)
    _require(not unknown, f"mamba_ssm ssm_cfg: unknown key(s) {unknown} for {layer}; known: {sorted(allowed)}")
    kwargs: dict[str, Any] = {}
    if layer == "Mamba1":
        m1 = {k: v for k, v in ssm.items() if k not in ("use_fast_path", "layer")}
        if m1.get("dt_rank") == "auto":
            m1["dt_rank"] = None
        kwargs["mamba1"] = Mamba1Config(**m1)
        ssm_char = P.MAMBA1
    else:
        m2 = {k: v for k, v in ssm.items() if k not in ("use_mem_eff_path", "layer", "conv_init")}
        _require(m2.pop("rmsnorm", True), "mamba_ssm Mamba2 with rmsnorm=False is not supported: our Mamba-2 "
                                          "always has its gated RMSNorm")
        d_inner = m2.get("expand", 2) * d_model
        d_ssm = m2.pop("d_ssm", None)
        _require(d_ssm is None or d_ssm == d_inner,
                 f"mamba_ssm Mamba2 with d_ssm={d_ssm} < d_inner={d_inner} (a gated MLP inside in_proj) is not "
                 "supported")
        if "A_init_range" in m2:
            m2["A_init_min"], m2["A_init_max"] = (float(v) for v in m2.pop("A_init_range"))
        if "dt_limit" in m2:
            m2["dt_limit_min"], m2["dt_limit_max"] = (_as_float(v) for v in m2.pop("dt_limit"))
        kwargs["mamba2"] = Mamba2Config(**m2)
        ssm_char = P.MAMBA2

    attn_idx = {int(i) for i in (c["attn_layer_idx"] or [])}
    if attn_idx:
        kwargs["attention"] = _attention_from_mha(dict(c["attn_cfg"] or {}), d_model)
    d_intermediate = int(c["d_intermediate"])
    if d_intermediate > 0:
        hidden = -(-d_intermediate // GATED_MLP_MULTIPLE) * GATED_MLP_MULTIPLE
        kwargs["mlp"] = MLPConfig(hidden_size=hidden, activation="swiglu", bias=False)
    blocks = []
    for i in range(n):
        blocks.append(P.ATTENTION if i in attn_idx else ssm_char)
        if d_intermediate > 0:
            blocks.append(P.MLP)
    return ModelConfig(
        d_model=d_model, pattern="".join(blocks), vocab_size=int(c["vocab_size"]),
        pad_vocab_size_multiple=int(c["pad_vocab_size_multiple"]), tie_embeddings=bool(c["tie_embeddings"]),
        norm_eps=1e-5,  # MixerModel's norm_epsilon: not in the config, always its default
        residual_in_fp32=bool(c["residual_in_fp32"]), domain="lm", **kwargs,
    )


def _attention_from_mha(cfg: dict[str, Any], d_model: int) -> AttentionConfig:
    unknown = sorted(set(cfg) - _MHA_KEYS)
    _require(not unknown, f"mamba_ssm attn_cfg: unknown key(s) {unknown}; known: {sorted(_MHA_KEYS)}")
    _require("num_heads" in cfg, "mamba_ssm attn_cfg needs num_heads")
    n_heads = int(cfg["num_heads"])
    head_dim = cfg.get("head_dim") or d_model // n_heads
    _require(cfg.get("causal", False), "mamba_ssm attn_cfg: causal=False (bidirectional attention) is not "
                                       "supported by our causal attention; set causal=True")
    _require(not cfg.get("d_conv", 0), f"mamba_ssm attn_cfg: d_conv={cfg.get('d_conv')} (a short convolution "
                                       "over q, k, v) is not supported by our attention")
    _require(not cfg.get("mlp_dim", 0), f"mamba_ssm attn_cfg: mlp_dim={cfg.get('mlp_dim')} (an MLP fused into "
                                        "the attention) is not supported")
    _require(cfg.get("softmax_scale") is None, "mamba_ssm attn_cfg: a custom softmax_scale is not supported "
                                               "(ours is 1/sqrt(head_dim))")
    rotary = int(cfg.get("rotary_emb_dim", 0))
    _require(rotary in (0, head_dim), f"mamba_ssm attn_cfg: rotary_emb_dim={rotary} rotates part of the "
                                      f"head_dim={head_dim}; our RoPE rotates all of it (or none)")
    return AttentionConfig(
        n_heads=n_heads, n_kv_heads=cfg.get("num_heads_kv"),
        head_dim=None if head_dim * n_heads == d_model else head_dim, rope=rotary > 0,
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
        qkv_bias=bool(cfg.get("qkv_proj_bias", True)), out_bias=bool(cfg.get("out_proj_bias", True)),
    )


def state_dict_from_mamba_ssm(data: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                              config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict from a mamba_ssm ``MambaLMHeadModel`` one."""
    config = config_from_mamba_ssm(data) if config is None else config
    c = {**MAMBA_SSM_DEFAULTS, **data}
    per_layer = 2 if int(c["d_intermediate"]) > 0 else 1
    attn_cfg = dict(c["attn_cfg"] or {})
    a = config.attention
    n_kv = a.n_heads if a.n_kv_heads is None else a.n_kv_heads
    head_dim = config.d_model // a.n_heads if a.head_dim is None else a.head_dim
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if key in ("backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"):
            out[key] = tensor
            continue
        match = re.fullmatch(r"backbone\.layers\.(\d+)\.(norm|mixer|norm2|mlp)\.(.+)", key)
        if match is None:
            unmapped.append(key)
            continue
        i, part, rest = int(match[1]), match[2], match[3]
        k = per_layer * i
        char = config.pattern[k]
        if part == "norm":
            out[f"backbone.layers.{k}.norm.{rest}"] = tensor
        elif part == "norm2":
            out[f"backbone.layers.{k + 1}.norm.{rest}"] = tensor
        elif part == "mlp":
            mlp = f"backbone.layers.{k + 1}.mixer"
            if rest.startswith("fc1."):
                up, gate = tensor.chunk(2, dim=0)  # GatedMLP: y, gate = fc1(x).chunk(2); y * silu(gate)
                suffix = rest[len("fc1."):]
                out[f"{mlp}.up_proj.{suffix}"], out[f"{mlp}.gate_proj.{suffix}"] = up, gate
            elif rest.startswith("fc2."):
                out[f"{mlp}.down_proj.{rest[len('fc2.'):]}"] = tensor
            else:
                unmapped.append(key)
        elif char == P.ATTENTION and rest.startswith("in_proj."):
            q, k_, v = tensor.split([a.n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=0)
            if a.rope and attn_cfg.get("rotary_emb_interleaved", False):
                q = _interleaved_to_half(q, a.n_heads, head_dim)
                k_ = _interleaved_to_half(k_, n_kv, head_dim)
            suffix = rest[len("in_proj."):]
            mixer = f"backbone.layers.{k}.mixer"
            out[f"{mixer}.q_proj.{suffix}"], out[f"{mixer}.k_proj.{suffix}"] = q, k_
            out[f"{mixer}.v_proj.{suffix}"] = v
        elif char == P.ATTENTION and rest.startswith("out_proj."):
            out[f"backbone.layers.{k}.mixer.o_proj.{rest[len('out_proj.'):]}"] = tensor
        else:
            out[f"backbone.layers.{k}.mixer.{rest}"] = tensor
    if unmapped:
        raise ConversionError(f"mamba_ssm state dict has keys that map to no parameter of ours: {_head(unmapped)}")
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
