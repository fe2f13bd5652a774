"""The backbone and the causal LM: an embedding, a stack of pre-norm residual blocks, a final norm.

    h_0 = embedding(input_ids)                       [B, L, d_model]
    h_i = h_{i-1} + mixer_i(norm_i(h_{i-1}))         one block per character of config.pattern
    logits = lm_head(norm_f(h_n))[..., :vocab_size]  [B, L, vocab_size], float32
    loss = mean cross-entropy(logits, labels)        labels != -100; over chunks of positions when
                                                     config.loss_chunk_size is set (no logits then)

Module names are mamba_ssm's ``MambaLMHeadModel`` (``backbone.embedding``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer``, ``backbone.norm_f``, ``lm_head``), so its checkpoints load by name for
the blocks whose mixers keep its parameter names (see docs/architecture.md).

Differences from mamba_ssm's blocks, and why:
- One residual per block. mamba_ssm's ``Block`` with an MLP (``d_intermediate > 0``) has two residuals
  (mixer, then MLP); here the MLP is its own block (``-``), as in Megatron-LM's hybrids, so a pattern can
  place MLPs anywhere. The depth used to rescale the output projections is therefore ``len(pattern)``.
- The residual stream is kept in float32 when ``config.residual_in_fp32`` (as mamba_ssm's
  ``residual_in_fp32``): the block normalizes the float32 stream and casts the normalized input to the
  model dtype, which is a little more precise than mamba_ssm's unfused path (that casts the residual
  before normalizing) and equal to its fused add+norm kernel.

Bidirectional use (DNA, later) will reuse :class:`Backbone` as is; only the head and the loss differ.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core import pattern as P
from core.cache import InferenceCache, ssm_state_dtype_for
from core.chunked_loss import IGNORE_INDEX, chunked_cross_entropy  # IGNORE_INDEX: -100, importable from here too
from core.config import ModelConfig
from core.layers.norm import RMSNorm
from kernels.norm import rms_norm

# The parameter (relative to its mixer) that writes each block's output into the residual stream; the
# GPT-2 / mamba_ssm scheme rescales it by 1/sqrt(depth). The MoE's stacked experts are [E, d_model, hidden].
OUTPUT_PROJECTIONS = ("out_proj.weight", "o_proj.weight", "down_proj.weight", "experts.down_proj")


# --------------------------------------------------------------------------------------------------
# Shape validation: every problem of a config at once, before a single tensor is allocated.
# --------------------------------------------------------------------------------------------------

def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_problems(config: ModelConfig) -> list[str]:
    """Everything wrong with ``config``'s shapes, each as ``"<field>: <problem>; <fix>"`` (empty: valid).

    Only the sub-configs of the block types that ``config.pattern`` uses are checked.
    """
    problems: list[str] = []
    add = problems.append
    if not _positive_int(config.d_model):
        add(f"d_model: must be a positive int, got {config.d_model!r}")
        return problems  # every other check divides by it
    d_model = config.d_model
    if not _positive_int(config.vocab_size):
        add(f"vocab_size: must be a positive int, got {config.vocab_size!r}; set it to the tokenizer's size")
    if not isinstance(config.pad_vocab_size_multiple, int) or config.pad_vocab_size_multiple < 1:
        add(f"pad_vocab_size_multiple: must be an int >= 1 (1: no padding), got {config.pad_vocab_size_multiple!r}")
    if not config.norm_eps > 0:
        add(f"norm_eps: must be > 0, got {config.norm_eps}")
    if not config.initializer_range > 0:
        add(f"initializer_range: must be > 0 (the embedding's init std), got {config.initializer_range}")
    if config.loss_chunk_size is not None and not _positive_int(config.loss_chunk_size):
        add(f"loss_chunk_size: must be a positive int (positions per chunk of the LM head + cross-entropy) or "
            f"None (all logits at once), got {config.loss_chunk_size!r}")
    try:
        P.validate_pattern(config.pattern)
    except (TypeError, ValueError) as error:
        add(f"pattern: {error}")
        return problems
    used = set(config.pattern)

    if P.MAMBA1 in used:
        c = config.mamba1
        where = "mamba1"
        for name in ("d_state", "d_conv", "expand"):
            if not _positive_int(getattr(c, name)):
                add(f"{where}.{name}: must be a positive int, got {getattr(c, name)!r}")
        if c.dt_rank is not None and not _positive_int(c.dt_rank):
            add(f"{where}.dt_rank: must be a positive int or None (ceil(d_model / 16)), got {c.dt_rank!r}")
        if c.dt_init not in ("random", "constant"):
            add(f"{where}.dt_init: must be 'random' or 'constant', got {c.dt_init!r}")
        if not 0 < c.dt_min <= c.dt_max:
            add(f"{where}.dt_min/dt_max: need 0 < dt_min <= dt_max, got {c.dt_min} and {c.dt_max}")

    if P.MAMBA2 in used:
        c = config.mamba2
        where = "mamba2"
        ok = True
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if not _positive_int(getattr(c, name)):
                add(f"{where}.{name}: must be a positive int, got {getattr(c, name)!r}")
                ok = False
        if ok:
            d_inner = c.expand * d_model
            if d_inner % c.headdim != 0:
                divisors = [h for h in (16, 32, 64, 128) if d_inner % h == 0]
                add(f"{where}.headdim: {c.headdim} does not divide d_inner = expand * d_model = "
                    f"{c.expand} * {d_model} = {d_inner}; pick a headdim that divides it (e.g. {divisors}) "
                    f"or change d_model / expand")
            else:
                nheads = d_inner // c.headdim
                if nheads % c.ngroups != 0:
                    add(f"{where}.ngroups: {c.ngroups} does not divide the number of heads "
                        f"d_inner / headdim = {d_inner} / {c.headdim} = {nheads}; each group of B, C is "
                        f"shared by a whole number of heads, so pick ngroups among the divisors of {nheads}")
        if not 0 < c.A_init_min <= c.A_init_max:
            add(f"{where}.A_init_min/A_init_max: need 0 < A_init_min <= A_init_max, got {c.A_init_min} and "
                f"{c.A_init_max}")
        if not 0 < c.dt_min <= c.dt_max:
            add(f"{where}.dt_min/dt_max: need 0 < dt_min <= dt_max, got {c.dt_min} and {c.dt_max}")
        if not 0 <= c.dt_limit_min < c.dt_limit_max:
            add(f"{where}.dt_limit_min/dt_limit_max: need 0 <= min < max, got {c.dt_limit_min} and {c.dt_limit_max}")

    if P.ATTENTION in used:
        c = config.attention
        where = "attention"
        if not _positive_int(c.n_heads):
            add(f"{where}.n_heads: must be a positive int, got {c.n_heads!r}")
        else:
            n_kv = c.n_heads if c.n_kv_heads is None else c.n_kv_heads
            if not _positive_int(n_kv):
                add(f"{where}.n_kv_heads: must be a positive int or None (= n_heads), got {c.n_kv_heads!r}")
            elif c.n_heads % n_kv != 0:
                divisors = [k for k in range(1, c.n_heads + 1) if c.n_heads % k == 0]
                add(f"{where}.n_kv_heads: {n_kv} does not divide n_heads = {c.n_heads} (grouped-query "
                    f"attention shares each key/value head among a whole group of query heads); pick one of "
                    f"{divisors}")
            if c.head_dim is None:
                if d_model % c.n_heads != 0:
                    add(f"{where}.n_heads: d_model = {d_model} is not divisible by n_heads = {c.n_heads}; pick "
                        f"n_heads dividing d_model or set attention.head_dim explicitly")
                head_dim = d_model // c.n_heads
            else:
                head_dim = c.head_dim
                if not _positive_int(head_dim):
                    add(f"{where}.head_dim: must be a positive int or None (d_model // n_heads), got {head_dim!r}")
            if c.rope and isinstance(head_dim, int) and head_dim % 2 != 0:
                add(f"{where}.rope: rotary embeddings need an even head_dim, got {head_dim}; change n_heads / "
                    f"head_dim or set attention.rope=False")

    for char, where in ((P.MLP, "mlp"), (P.MOE, "moe")):
        if char not in used:
            continue
        c = getattr(config, where)
        if c.activation not in ("swiglu", "gelu"):
            add(f"{where}.activation: unknown {c.activation!r}; choose 'swiglu' or 'gelu'")
        if c.hidden_size is not None and not _positive_int(c.hidden_size):
            add(f"{where}.hidden_size: must be a positive int or None (the default width), got {c.hidden_size!r}")
        if not _positive_int(c.multiple_of):
            add(f"{where}.multiple_of: must be a positive int, got {c.multiple_of!r}")

    if P.MOE in used:
        c = config.moe
        if not _positive_int(c.n_experts):
            add(f"moe.n_experts: must be a positive int, got {c.n_experts!r}")
        elif not _positive_int(c.top_k) or c.top_k > c.n_experts:
            add(f"moe.top_k: must be in [1, n_experts = {c.n_experts}], got {c.top_k!r}")
        if c.capacity_factor is not None and not c.capacity_factor > 0:
            add(f"moe.capacity_factor: must be > 0 or None (dropless), got {c.capacity_factor}")

    if P.HYENA in used:
        c = config.hyena
        where = "hyena"
        for name in ("order", "short_filter_order", "filter_order", "max_seqlen"):
            if not _positive_int(getattr(c, name)):
                add(f"{where}.{name}: must be a positive int, got {getattr(c, name)!r}")
        if _positive_int(c.order) and c.order < 2:
            add(f"{where}.order: must be >= 2 (order 1 has no long convolution), got {c.order}")
        if not _positive_int(c.filter_emb_dim) or c.filter_emb_dim < 3 or c.filter_emb_dim % 2 != 1:
            add(f"{where}.filter_emb_dim: must be odd and >= 3 (1 time feature + 2 per frequency band), got "
                f"{c.filter_emb_dim!r}")
        if not isinstance(c.filter_layers, int) or c.filter_layers < 0:
            add(f"{where}.filter_layers: must be an int >= 0, got {c.filter_layers!r}")
    return problems


def validate_config(config: ModelConfig) -> ModelConfig:
    """Raise one ``ValueError`` listing every shape problem of ``config`` (see :func:`config_problems`)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a core.config.ModelConfig, got {type(config).__name__}")
    problems = config_problems(config)
    if problems:
        label = f" {config.name!r}" if config.name else ""
        raise ValueError(f"invalid model config{label}:\n- " + "\n- ".join(problems))
    return config


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------

def build_mixer(
    char: str,
    d_model: int,
    config: ModelConfig,
    layer_idx: int = 0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The mixer of one block: the class that ``char`` names, built from its sub-config of ``config``."""
    # Imported here so that a model using only some block types needs only their modules.
    if char == P.MAMBA2:
        from core.layers.mamba2 import Mamba2 as cls
        sub = config.mamba2
    elif char == P.ATTENTION:
        from core.layers.attention import Attention as cls
        sub = config.attention
    elif char == P.MLP:
        from core.layers.mlp import MLP as cls
        sub = config.mlp
    elif char == P.MOE:
        from core.layers.moe import MoE as cls
        sub = config.moe
    elif char == P.MAMBA1:
        from core.layers.mamba1 import Mamba1 as cls
        sub = config.mamba1
    elif char == P.HYENA:
        from core.layers.hyena import Hyena as cls
        sub = config.hyena
    elif char == P.S4D:
        from core.layers.s4d import S4D as cls
        sub = config.s4d
    else:
        P.validate_pattern(char)  # raises with the table
        raise AssertionError(f"block character {char!r} is in the table but has no mixer")
    return cls(d_model, sub, layer_idx=layer_idx, norm_eps=config.norm_eps, device=device, dtype=dtype)


def upcast_residual(x: torch.Tensor) -> torch.Tensor:
    """The residual stream's dtype with ``residual_in_fp32``: at least float32 (float64 stays)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def upcast_residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`upcast_residual` gives a tensor of ``dtype``, without converting one (a decoding
    step would pay a kernel for it)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class Block(nn.Module):
    """One pre-norm residual block: ``x + mixer(norm(x))``.

    x [B, L, d_model]: float32 (float64 for a float64 model) when the residual stream is kept in
    float32, else the model dtype.
    Returns (x', aux): x' like x; aux the mixer's auxiliary losses (MoE), else an empty dict.
    """

    def __init__(
        self,
        char: str,
        config: ModelConfig,
        layer_idx: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.char = char
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
        self.mixer = build_mixer(char, config.d_model, config, layer_idx, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cache: object | None = None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The mixer runs in the model dtype whatever the stream's dtype (under autocast the params are
        # float32 and autocast picks the matmul dtype).
        h = self.norm(x).to(self.norm.weight.dtype)
        out = self.mixer(h, cache=cache, padding_mask=padding_mask)
        aux: dict[str, torch.Tensor] = {}
        if isinstance(out, tuple):  # the MoE returns (y, aux)
            out, aux = out
        if self.residual_in_fp32:
            x = upcast_residual(x)
        if torch.promote_types(x.dtype, out.dtype) == x.dtype:
            # The add promotes a lower-precision out itself (exactly: bf16 / fp16 -> fp32): one kernel
            # instead of a cast pass over [B, L, d_model] and the add, with the same result.
            return x + out, aux
        return x + out.to(x.dtype), aux

    def extra_repr(self) -> str:
        return f"char={self.char!r}, layer_idx={self.layer_idx}"


def _called_plainly(module: nn.Module) -> bool:
    """Whether calling ``module`` runs just its class's forward: no forward replaced on the instance (a
    compiled block: core.parallel.compile_blocks) and no forward hooks (probes), which a path that
    bypasses the call would skip."""
    return ("forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


class Backbone(nn.Module):
    """Embedding, blocks, final norm: input_ids int64 [B, L] -> hidden [B, L, d_model] (+ aux losses).

    With a cache (:class:`InferenceCache`), block i continues from ``cache.layers[i]`` and the forward
    advances ``cache.seqlen_offset`` by L. Ids at pad positions (``padding_mask`` False) are ignored.

    The hidden states are normalized by ``norm_f`` and returned in float32 when the residual stream
    is, else in the model dtype. With ``num_last_tokens`` > 0 only the last that many positions are
    normalized and returned (generation's prefill: the final add and norm of a 512-token batch-64 prompt
    are ~0.2 ms on an H100 when run over every position).
    """

    def __init__(self, config: ModelConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        validate_config(config)
        self.config = config
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            Block(char, config, layer_idx=i, device=device, dtype=dtype) for i, char in enumerate(config.pattern)
        )
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: InferenceCache | None = None,
        padding_mask: torch.Tensor | None = None,
        num_last_tokens: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if padding_mask is not None:
            # A pad's id is never looked up, so any pad id (-1 included) is fine.
            input_ids = input_ids.masked_fill(~padding_mask, 0)
        x = self.embedding(input_ids)
        if self._fused_norms():
            return self._forward_fused_norms(x, cache, padding_mask, input_ids.shape[1], num_last_tokens)
        if self.residual_in_fp32:
            x = upcast_residual(x)
        aux_losses: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, aux = layer(x, cache=layer_cache, padding_mask=padding_mask)
            for name, value in aux.items():
                aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return self.norm_f(_last(x, num_last_tokens)), aux_losses

    def _fused_norms(self) -> bool:
        """Whether :meth:`forward` may add each block's output to the stream inside the next block's norm
        (one ``rms_norm(..., residual=...)`` kernel instead of an add, a norm and a cast): without
        autograd and autocast, with the standard blocks called plainly (not compiled, no hooks)."""
        return (not torch.is_grad_enabled() and not torch.is_autocast_enabled()
                and all(type(block) is Block and type(block.norm) is RMSNorm and _called_plainly(block)
                        and _called_plainly(block.norm) for block in self.layers))

    def _forward_fused_norms(self, x: torch.Tensor, cache: InferenceCache | None,
                             padding_mask: torch.Tensor | None, seqlen: int,
                             num_last_tokens: int = 0) -> tuple[torch.Tensor, dict]:
        """:meth:`forward` for inference (a prefill, an evaluation): Block.forward's float32 arithmetic
        (the sum stored in the stream's dtype, then normalized and rounded to the norm's output dtype),
        reading and writing the [B, L, d_model] stream once a block instead of three times."""
        stream_dtype = upcast_residual_dtype(x.dtype) if self.residual_in_fp32 else x.dtype
        aux_losses: dict[str, torch.Tensor] = {}
        residual, out = None, x  # the stream is residual + out (the previous block's output, not yet added)
        for i, block in enumerate(self.layers):
            h, residual = rms_norm(out, block.norm.weight, block.norm.eps, residual=residual,
                                   residual_out_dtype=stream_dtype)
            out = block.mixer(h.to(block.norm.weight.dtype), cache=None if cache is None else cache.layers[i],
                              padding_mask=padding_mask)
            if isinstance(out, tuple):  # the MoE's (y, aux)
                out, aux = out
                for name, value in aux.items():
                    aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        if cache is not None:
            cache.seqlen_offset += seqlen
        return self.norm_f(_last(residual, num_last_tokens) + _last(out, num_last_tokens)), aux_losses


def _last(x: torch.Tensor, num_last_tokens: int) -> torch.Tensor:
    """x [B, L, ...] -> its last num_last_tokens positions (all of them for 0)."""
    return x[:, -num_last_tokens:] if num_last_tokens > 0 else x


# --------------------------------------------------------------------------------------------------
# The causal LM
# --------------------------------------------------------------------------------------------------

@dataclass
class CausalLMOutput:
    """What :meth:`CausalLM.forward` returns.

    logits:     float32 [B, L, vocab_size] (the padded embedding rows are dropped); None from a forward
                with labels and no cache when ``config.loss_chunk_size`` is set (the chunked loss never
                materializes them).
    loss:       scalar float32, ``ce_loss + sum(aux_losses.values())``; None without labels.
    ce_loss:    scalar float32, the mean cross-entropy over labels != -100 (what perplexity is made
                of; 0 when every label is ignored); None without labels.
    aux_losses: the MoE layers' auxiliary losses summed over layers, already weighted by their
                coefficients (``{"load_balancing": ..., "router_z": ...}``); empty without MoE.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class CausalLM(nn.Module):
    """A causal language model over ``config.pattern``: ``backbone`` and ``lm_head``.

    ``lm_head`` is a bias-free Linear d_model -> padded_vocab_size whose weight *is* the embedding's
    when ``config.tie_embeddings``. Built on ``device`` / ``dtype`` (e.g. ``device="meta"`` to count a
    large model's parameters without memory). The config is validated first, so a bad shape fails with
    a message naming the field and the fix before any tensor is allocated.

    ``config.loss_chunk_size`` (None by default) chooses how a forward with labels computes the loss:
    None builds the [B, L, vocab] logits and their cross-entropy at once; n > 0 runs the head and the
    cross-entropy over chunks of n positions (:mod:`core.chunked_loss`), never holding all the logits,
    and returns ``logits=None``. Parameters and state dict are the same either way.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        validate_config(config)
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        init_weights(self, config)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: InferenceCache | None = None,
        padding_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_last_tokens: int = 0,
    ) -> CausalLMOutput:
        """input_ids int64 [B, L] -> :class:`CausalLMOutput`.

        cache:           an :class:`InferenceCache` from :meth:`allocate_cache`; the forward continues
                         from it, leaves the state after these tokens in it and advances ``seqlen_offset``.
        padding_mask:    bool [B, L], True = real token; marks left padding (see docs/architecture.md).
        labels:          int64 [B, L] aligned with the positions: ``labels[:, t]`` is the target of the
                         prediction made at position t (the data pipeline shifts, as nanoGPT's x / y);
                         -100 is ignored.
        num_last_tokens: > 0 computes the logits of the last that many positions only (generation).

        With labels, no cache and ``config.loss_chunk_size`` set, the loss is computed over chunks of
        that many positions and the output has ``logits=None`` (loss, ce_loss and aux_losses as
        without chunking, and so are the gradients). Every other call (no labels: evaluation,
        generation; a cache) returns the logits whatever the setting.
        """
        self._check_inputs(input_ids, cache, padding_mask, labels, num_last_tokens)
        # Only the positions whose logits are asked for go through the final norm (no labels then).
        hidden, aux_losses = self.backbone(input_ids, cache=cache, padding_mask=padding_mask,
                                           num_last_tokens=num_last_tokens)
        chunk_size = self.config.loss_chunk_size
        if labels is not None and cache is None and chunk_size:
            # The logits are the largest tensor of a long-sequence training step: never build them.
            loss_sum = chunked_cross_entropy(hidden, self.lm_head.weight, labels, self.config.vocab_size, chunk_size)
            output = CausalLMOutput(logits=None, aux_losses=aux_losses)
            output.ce_loss = loss_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
        else:
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))[..., : self.config.vocab_size].float()
            output = CausalLMOutput(logits=logits, aux_losses=aux_losses)
            if labels is not None:
                output.ce_loss = cross_entropy(logits, labels)
        if labels is not None:
            output.loss = output.ce_loss + sum(aux_losses.values()) if aux_losses else output.ce_loss
        return output

    def _check_inputs(self, input_ids: torch.Tensor, cache: InferenceCache | None,
                      padding_mask: torch.Tensor | None, labels: torch.Tensor | None,
                      num_last_tokens: int) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 [B, L] token ids, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        batch, seqlen = input_ids.shape
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != input_ids.shape):
            raise ValueError(f"padding_mask must be bool [B, L] = {list(input_ids.shape)} (True = real "
                             f"token), got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)} (labels[:, t] "
                                 f"is the target at position t), got {tuple(labels.shape)}")
            if num_last_tokens:
                raise ValueError("num_last_tokens drops positions and cannot be combined with labels")
        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"the cache was allocated for batch {cache.batch_size}, input_ids has batch "
                                 f"{batch}; allocate_cache(batch_size={batch}, ...)")
            if len(cache.layers) != len(self.backbone.layers):
                raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.backbone.layers)}; "
                                 "allocate it with this model's allocate_cache")
            if cache.seqlen_offset + seqlen > cache.max_seqlen:
                raise ValueError(f"the cache has seen {cache.seqlen_offset} of max_seqlen={cache.max_seqlen} "
                                 f"tokens and {seqlen} more do not fit; allocate it with a larger max_seqlen")

    def allocate_cache(self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None, ssm_state_dtype: torch.dtype | None = None) -> InferenceCache:
        """An empty :class:`InferenceCache`: one entry per block from its mixer (None for MLP / MoE).

        device and dtype default to the embedding's. ssm_state_dtype: the Mamba layers' recurrent state
        (default float32; bfloat16 / float16 halve it, as mamba_ssm keeps it: ``core.cache.ssm_state_dtype_for``);
        the other mixers' caches do not depend on it.
        """
        ssm_state_dtype_for(torch.float32, ssm_state_dtype)  # a bad value fails before any allocation
        if batch_size < 1 or max_seqlen < 1:
            raise ValueError(f"allocate_cache needs batch_size >= 1 and max_seqlen >= 1, got {batch_size}, "
                             f"{max_seqlen}")
        weight = self.backbone.embedding.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        layers = []
        for block in self.backbone.layers:
            allocate = getattr(block.mixer, "allocate_cache", None)
            if allocate is None:
                if block.char in P.SEQUENCE_MIXERS:
                    raise TypeError(f"{type(block.mixer).__name__} has no allocate_cache (docs/architecture.md)")
                layers.append(None)
            elif ssm_state_dtype is not None and "ssm_state_dtype" in inspect.signature(allocate).parameters:
                layers.append(allocate(batch_size, max_seqlen, device=device, dtype=dtype,
                                       ssm_state_dtype=ssm_state_dtype))
            else:
                layers.append(allocate(batch_size, max_seqlen, device=device, dtype=dtype))
        return InferenceCache(layers=layers, batch_size=batch_size, max_seqlen=max_seqlen)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameters of the module (tied weights once); without the embedding (and an untied head)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            total -= self.backbone.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, L, V] against labels [B, L] over labels != -100 (0 if none)."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return losses / count


# --------------------------------------------------------------------------------------------------
# Init (mamba_ssm's _init_weights)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """mamba_ssm's generic init, on top of each mixer's own.

    - Linear biases are zeroed, unless marked ``_no_reinit`` (the Mamba-1 dt bias keeps its
      inverse-softplus init); Linear weights keep their mixer's init (PyTorch's kaiming-uniform).
    - The embedding is normal(0, initializer_range).
    - With ``rescale_prenorm_residual`` (GPT-2's scheme), every block's output projection
      (``out_proj`` / ``o_proj`` / ``down_proj`` / the MoE's ``experts.down_proj``) is re-drawn
      kaiming-uniform(a=sqrt(5)) (uniform in +-1/sqrt(fan_in)) and divided by sqrt(len(pattern)): each
      block is one residual branch, so the stream's variance grows with the number of blocks.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=config.initializer_range)
    if not config.rescale_prenorm_residual:
        return
    depth = len(config.pattern)
    for block in model.backbone.layers:
        found = [p for name, p in block.mixer.named_parameters() if name in OUTPUT_PROJECTIONS]
        if not found:
            raise RuntimeError(
                f"block {block.layer_idx} ({type(block.mixer).__name__}) has none of the output projections "
                f"{OUTPUT_PROJECTIONS} named in docs/architecture.md, so rescale_prenorm_residual cannot "
                "find it; rename the parameter, or set rescale_prenorm_residual=False"
            )
        for weight in found:
            # A stacked [E, d_model, hidden] expert weight is E Linear weights; each gets fan_in = hidden.
            for matrix in (weight if weight.dim() == 3 else [weight]):
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
                matrix.div_(math.sqrt(depth))
