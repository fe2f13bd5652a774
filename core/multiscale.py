"""A SaShiMi-style multi-scale causal backbone (Goel et al. 2022, "It's Raw!"), with any blocks.

For pools ``(p_0, .., p_{S-1})`` and expand ``e`` the widths are ``w_i = d_model e^i`` and the sequence
at level i is ``P_i = p_0 ... p_{i-1}`` times shorter than the input. With ``run(i, x)`` the map of
level i on its input x [B, L_i, w_i]:

    run(S, x) = center(x) + x                                      the coarsest blocks
    run(i, x) = let c = run(i + 1, down_i(x))                      pool p_i samples into one of width w_{i+1}
                    u = shift(up_i(c)) + x                         U-Net skip from the level's input
                in  stage_i(u) + u                                 the level's blocks, plus a residual

    logits = lm_head(norm_f(run(0, embedding(ids))))

``down_i`` reshapes p_i consecutive samples into one vector and applies a Linear (w_i p_i -> w_{i+1});
``up_i`` applies a Linear (w_{i+1} -> w_i p_i) and unfolds it into p_i samples. The up path is shifted
by one coarse step (p_i samples) so that no sample sees the future: the coarse output k summarizes the
samples up to ``(k + 1) p_i - 1`` and is used for the samples of group k + 1. This is SaShiMi's
non-U-Net autoregressive layout (``Sashimi(unet=False)``): pooling without blocks before it, the skips
from each level's input, the residual around each stage. ``center`` and every ``stage_i`` are stacks of
this suite's pre-norm residual blocks (:class:`core.backbone.Block`), one per character of
``config.pattern`` (``center_pattern`` for the center), at the level's width; any mixer works (S4D
``L``, Mamba ``S`` / ``M``, attention, Hyena, MLP ``-``...).

Decoding. The cached forward is a streaming version of the same map: each down pool keeps the samples
of the group being filled (``PoolCache.pending``) and emits a coarse sample once p_i have arrived; each
up pool keeps the p_i fine values unfolded from the last coarse output (``PoolCache.up``, zeros at
first), the values of the samples of the current group. A chunk of any length (a prefill, one sample,
anything in between) runs the coarse level only on the coarse samples it completes, so the outputs of
pooled levels are produced only every P_i samples; a test checks forward == prefill + steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.backbone import OUTPUT_PROJECTIONS, Block, CausalLMOutput, cross_entropy, upcast_residual, validate_config
from core.cache import InferenceCache
from core.config import ModelConfig
from core.layers.norm import RMSNorm


@dataclass
class MultiScaleConfig:
    """The multi-scale model: the block recipe (``model``: width of the finest level, vocabulary,
    ``pattern`` of every level's stage, mixer sub-configs) and the pooling.

    pools:          pooling factor of each level, finest first (SaShiMi: [4, 4]); the input length needs
                    no alignment (it is padded at the end in training).
    expand:         width multiplier per level.
    center_pattern: the coarsest level's blocks; None: ``model.pattern``.
    """

    model: ModelConfig
    pools: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    center_pattern: str | None = None

    def widths(self) -> list[int]:
        return [self.model.d_model * self.expand ** i for i in range(len(self.pools) + 1)]

    def level_config(self, level: int) -> ModelConfig:
        """The block recipe at ``level`` (its width; the center's pattern at the coarsest level)."""
        pattern = self.model.pattern
        if level == len(self.pools) and self.center_pattern:
            pattern = self.center_pattern
        return dataclasses.replace(self.model, d_model=self.widths()[level], pattern=pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "pools": list(self.pools), "expand": self.expand,
                "center_pattern": self.center_pattern}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiScaleConfig:
        known = {"model", "pools", "expand", "center_pattern"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"multiscale: unknown key(s) {unknown}; known keys: {sorted(known)}")
        model = data["model"] if isinstance(data["model"], ModelConfig) else ModelConfig.from_dict(dict(data["model"]))
        return cls(model=model, pools=list(data.get("pools", [4, 4])), expand=int(data.get("expand", 2)),
                   center_pattern=data.get("center_pattern"))

    def validate(self) -> None:
        problems = []
        if not self.pools or not all(isinstance(p, int) and p >= 2 for p in self.pools):
            problems.append(f"pools: need a non-empty list of ints >= 2 (SaShiMi: [4, 4]), got {self.pools!r}")
        if not isinstance(self.expand, int) or self.expand < 1:
            problems.append(f"expand: must be an int >= 1, got {self.expand!r}")
        if self.model.loss_chunk_size is not None:
            # Its loss is computed from full logits (samples are short next to a vocabulary of 256).
            problems.append(f"model.loss_chunk_size: the multi-scale model has no chunked loss; leave it unset "
                            f"(got {self.model.loss_chunk_size!r})")
        if problems:
            raise ValueError("invalid multi-scale config:\n- " + "\n- ".join(problems))
        for level in range(len(self.pools) + 1):
            try:
                validate_config(self.level_config(level))
            except ValueError as error:
                raise ValueError(f"multi-scale level {level} (width {self.widths()[level]}): {error}") from error

    @property
    def total_pool(self) -> int:
        return math.prod(self.pools)


@dataclass
class PoolCache:
    """One level's pooling state while decoding.

    pending: [B, p, w_i] the samples of the coarse group being filled (the first ``offset % p`` rows).
    up:      [B, p, w_i] the up-pooled values of the current group (from the last coarse output).
    """

    pending: torch.Tensor
    up: torch.Tensor


class Stage(nn.Module):
    """A stack of pre-norm residual blocks at one width: [B, L, w] -> [B, L, w] (float32 stream)."""

    def __init__(self, config: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 first_layer_idx: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(c, config, layer_idx=first_layer_idx + i, device=device, dtype=dtype)
                                    for i, c in enumerate(config.pattern))

    def forward(self, x: torch.Tensor, caches: list[Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux_total: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cache=None if caches is None else caches[i])
            for name, value in aux.items():
                aux_total[name] = aux_total[name] + value if name in aux_total else value
        return x, aux_total


class MultiScaleLM(nn.Module):
    """The multi-scale causal model with :class:`core.backbone.CausalLM`'s interface (``forward``,
    ``allocate_cache``), so :func:`core.generate.generate` drives it. Left padding is not supported
    (pooling groups would be misaligned): batch prompts of equal length."""

    def __init__(self, config: MultiScaleConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        widths = config.widths()
        outer = config.model
        self.embedding = nn.Embedding(outer.padded_vocab_size, outer.d_model, device=device, dtype=dtype)
        self.down = nn.ModuleList(nn.Linear(widths[i] * p, widths[i + 1], device=device, dtype=dtype)
                                  for i, p in enumerate(config.pools))
        self.up = nn.ModuleList(nn.Linear(widths[i + 1], widths[i] * p, device=device, dtype=dtype)
                                for i, p in enumerate(config.pools))
        n_levels = len(config.pools)
        idx = 0
        stages = []
        for level in range(n_levels):
            stages.append(Stage(config.level_config(level), device, dtype, first_layer_idx=idx))
            idx += len(stages[-1].layers)
        self.stages = nn.ModuleList(stages)
        self.center = Stage(config.level_config(n_levels), device, dtype, first_layer_idx=idx)
        self.norm_f = RMSNorm(outer.d_model, eps=outer.norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(outer.d_model, outer.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self._init_weights()
        if outer.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """core.backbone.init_weights' scheme: zero Linear biases (unless ``_no_reinit``), normal
        embedding, output projections of every block rescaled by 1/sqrt(number of blocks)."""
        outer = self.config.model
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=outer.initializer_range)
        if not outer.rescale_prenorm_residual:
            return
        blocks = [b for stage in self.all_stages() for b in stage.layers]
        for block in blocks:
            for name, weight in block.mixer.named_parameters():
                if name in OUTPUT_PROJECTIONS:
                    for matrix in (weight if weight.dim() == 3 else [weight]):
                        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
                        matrix.div_(math.sqrt(len(blocks)))

    def all_stages(self) -> list[Stage]:
        """Finest level's stage first, the center last (the cache's block order)."""
        return [*self.stages, self.center]

    # ----------------------------------------------------------------------------------------------
    # Training forward: whole sequences, padded at the end to a multiple of the total pooling
    # ----------------------------------------------------------------------------------------------

    def _level(self, level: int, x: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        if level == len(self.config.pools):
            y, a = self.center(x)
            _merge(aux, a)
            return y + x
        batch, length, width = x.shape
        p = self.config.pools[level]
        coarse = self.down[level](x.reshape(batch, length // p, p * width).to(self.down[level].weight.dtype))
        coarse = self._level(level + 1, upcast_residual(coarse), aux)
        up = self.up[level](coarse.to(self.up[level].weight.dtype)).reshape(batch, length, width)
        up = F.pad(up, (0, 0, p, 0))[:, :length]  # shift by one coarse step: causality
        u = up.to(x.dtype) + x
        y, a = self.stages[level](u)
        _merge(aux, a)
        return y + u

    # ----------------------------------------------------------------------------------------------
    # Streaming forward with a cache: any chunk length, coarse levels run on the samples they complete
    # ----------------------------------------------------------------------------------------------

    def _level_cached(self, level: int, x: torch.Tensor, offset: int, cache: InferenceCache,
                      aux: dict[str, torch.Tensor]) -> torch.Tensor:
        stages = self.all_stages()
        if level == len(self.config.pools):
            y, a = self.center(x, self._block_caches(cache, level))
            _merge(aux, a)
            return y + x
        batch, length, width = x.shape
        p = self.config.pools[level]
        pool: PoolCache = cache.layers[self._pool_index(level)]
        filled = offset % p
        joined = torch.cat([pool.pending[:, :filled].to(x.dtype), x], dim=1)
        n_coarse = joined.shape[1] // p
        rest = joined[:, n_coarse * p:]
        pool.pending[:, : rest.shape[1]] = rest.to(pool.pending.dtype)
        values = [pool.up.to(x.dtype, copy=True)]  # a copy: pool.up is overwritten below
        if n_coarse > 0:
            groups = joined[:, : n_coarse * p].reshape(batch, n_coarse, p * width)
            coarse = self.down[level](groups.to(self.down[level].weight.dtype))
            coarse = self._level_cached(level + 1, upcast_residual(coarse), offset // p, cache, aux)
            new_up = self.up[level](coarse.to(self.up[level].weight.dtype)).reshape(batch, n_coarse * p, width)
            values.append(new_up.to(x.dtype))
            pool.up.copy_(new_up[:, -p:].to(pool.up.dtype))
        up = torch.cat(values, dim=1)[:, filled: filled + length]
        u = up + x
        y, a = stages[level](u, self._block_caches(cache, level))
        _merge(aux, a)
        return y + u

    def _block_caches(self, cache: InferenceCache, level: int) -> list[Any]:
        start = sum(len(s.layers) for s in self.all_stages()[:level])
        return cache.layers[start: start + len(self.all_stages()[level].layers)]

    def _pool_index(self, level: int) -> int:
        return sum(len(s.layers) for s in self.all_stages()) + level

    # ----------------------------------------------------------------------------------------------
    # The model's interface
    # ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_last_tokens: int = 0) -> CausalLMOutput:
        """input_ids int64 [B, L] -> :class:`core.backbone.CausalLMOutput` (logits float32 [B, L, V])."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] token ids, got shape {tuple(input_ids.shape)}")
        if padding_mask is not None and not bool(padding_mask.all()):
            raise ValueError("MultiScaleLM does not support left padding (it would misalign the pooling "
                             "groups); give prompts of equal length")
        batch, length = input_ids.shape
        aux: dict[str, torch.Tensor] = {}
        x = self.embedding(input_ids)
        if self.config.model.residual_in_fp32:
            x = upcast_residual(x)
        if cache is None:
            total = self.config.total_pool
            padded = -(-length // total) * total
            x = F.pad(x, (0, 0, 0, padded - length))  # causal: the padding at the end changes nothing before it
            hidden = self._level(0, x, aux)[:, :length]
        else:
            if cache.batch_size != batch:
                raise ValueError(f"the cache was allocated for batch {cache.batch_size}, input_ids has batch {batch}")
            if cache.seqlen_offset + length > cache.max_seqlen:
                raise ValueError(f"the cache has seen {cache.seqlen_offset} of max_seqlen={cache.max_seqlen} "
                                 f"samples and {length} more do not fit; allocate it with a larger max_seqlen")
            hidden = self._level_cached(0, x, cache.seqlen_offset, cache, aux)
            cache.seqlen_offset += length
        hidden = self.norm_f(hidden)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))[..., : self.config.model.vocab_size].float()
        out = CausalLMOutput(logits=logits, aux_losses=aux)
        if labels is not None:
            out.ce_loss = cross_entropy(logits, labels)
            out.loss = out.ce_loss + sum(aux.values()) if aux else out.ce_loss
        return out

    def allocate_cache(self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> InferenceCache:
        """Block caches of every level (finest first, center last; coarse levels sized to
        ``ceil(max_seqlen / P_i)``), then one :class:`PoolCache` per level."""
        if batch_size < 1 or max_seqlen < 1:
            raise ValueError(f"allocate_cache needs batch_size >= 1 and max_seqlen >= 1, got {batch_size}, {max_seqlen}")
        weight = self.embedding.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        layers: list[Any] = []
        for level, stage in enumerate(self.all_stages()):
            level_len = -(-max_seqlen // math.prod(self.config.pools[:level]))
            for block in stage.layers:
                allocate = getattr(block.mixer, "allocate_cache", None)
                layers.append(None if allocate is None else allocate(batch_size, level_len, device=device, dtype=dtype))
        stream = torch.float32 if self.config.model.residual_in_fp32 and dtype != torch.float64 else dtype
        for level, p in enumerate(self.config.pools):
            width = self.config.widths()[level]
            layers.append(PoolCache(pending=torch.zeros(batch_size, p, width, device=device, dtype=stream),
                                    up=torch.zeros(batch_size, p, width, device=device, dtype=stream)))
        return InferenceCache(layers=layers, batch_size=batch_size, max_seqlen=max_seqlen)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _merge(total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for name, value in new.items():
        total[name] = total[name] + value if name in total else value
