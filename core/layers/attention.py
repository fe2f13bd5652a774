"""Causal softmax attention: multi-head or grouped-query, optional rotary embeddings, a KV cache.

Parameter names are Llama's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so a Llama attention
layer's weights load by name. The attention itself is ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels on GPU, the math kernel on CPU).

Positions and padding. ``padding_mask`` (bool [B, L], True = real token) marks left padding of
unequal prompts. Pad keys are masked out and rotary positions count from each row's first real token,
so the outputs at real positions equal those of the row run alone. The KV cache records which of its
positions are real (``KVCache.valid``), so later chunks and decoding steps keep masking the pads and
keep counting positions per row.

Rotary embeddings use the rotate-half convention of Llama / transformers: the head dimension splits into
halves (x1, x2), and ``rope(x) = x * cos + cat(-x2, x1) * sin`` with angles ``pos * theta^(-2i/head_dim)``
repeated over both halves. Angles are computed in float64 and applied in float32 (float64 for float64
inputs), then cast back, so long positions keep their precision whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.cache import KVCache
from core.config import AttentionConfig


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer ``positions`` [B, L]: each [B, 1, L, head_dim] in ``dtype``."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    inv_freq = theta ** (-exponents)  # [head_dim / 2]
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, L, head_dim] by the tables of :func:`rotary_cos_sin`; returns x's dtype."""
    xc = x.to(cos.dtype)
    x1, x2 = xc.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal MHA / GQA with optional RoPE and a preallocated KV cache.

    x [B, L, d_model] (any float dtype) -> y [B, L, d_model] (same dtype). ``n_kv_heads`` key/value heads
    are shared by groups of ``n_heads // n_kv_heads`` query heads (GQA; MQA when it is 1).
    """

    def __init__(
        self,
        d_model: int,
        config: AttentionConfig,
        layer_idx: int = 0,
        norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n_heads = config.n_heads
        n_kv_heads = n_heads if config.n_kv_heads is None else config.n_kv_heads
        if n_heads < 1 or n_kv_heads < 1:
            raise ValueError(f"attention needs n_heads >= 1 and n_kv_heads >= 1, got {n_heads} and {n_kv_heads}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"attention: n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (each key/value head "
                f"serves a whole group of query heads); pick n_kv_heads among the divisors of {n_heads}"
            )
        if config.head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(
                    f"attention: d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads "
                    f"that divides d_model, or set attention.head_dim explicitly"
                )
            head_dim = d_model // n_heads
        else:
            head_dim = config.head_dim
        if head_dim < 1:
            raise ValueError(f"attention: head_dim must be >= 1, got {head_dim}")
        if config.rope and head_dim % 2 != 0:
            raise ValueError(
                f"attention: rotary embeddings rotate pairs of features and need an even head_dim, got "
                f"{head_dim}; change n_heads / head_dim or set attention.rope=False"
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.rope = config.rope
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=config.qkv_bias, **factory)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=config.qkv_bias, **factory)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=config.qkv_bias, **factory)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=config.out_bias, **factory)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache: key/value [B, n_kv_heads, max_seqlen, head_dim], valid bool [B, max_seqlen]."""
        weight = self.k_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        shape = (batch_size, self.n_kv_heads, max_seqlen, self.head_dim)
        return KVCache(
            key=torch.zeros(shape, device=device, dtype=dtype),
            value=torch.zeros(shape, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, max_seqlen, device=device, dtype=torch.bool),
            length=0,
        )

    def _check(self, x: torch.Tensor, cache: KVCache | None, padding_mask: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention expects x [B, L, {self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != (batch, seqlen)):
            raise ValueError(
                f"padding_mask must be bool [B, L] = [{batch}, {seqlen}] (True = real token), got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"Attention needs a KVCache (from allocate_cache), got {type(cache).__name__}")
        if cache.key.shape[0] != batch:
            raise ValueError(f"the KV cache holds batch {cache.key.shape[0]}, but x has batch {batch}")
        max_seqlen = cache.key.shape[2]
        if cache.length + seqlen > max_seqlen:
            raise ValueError(
                f"KV cache overflow: it holds {cache.length} of max_seqlen={max_seqlen} positions and "
                f"{seqlen} more do not fit; allocate the cache with a larger max_seqlen"
            )

    def _positions(
        self, batch: int, seqlen: int, device: torch.device, cache: KVCache | None,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rotary position of each new token, int64 [B, L]: real tokens before it in its own row."""
        if cache is not None and cache.length > 0:
            offset = cache.valid[:, : cache.length].sum(dim=-1, keepdim=True)
        else:
            offset = torch.zeros(batch, 1, device=device, dtype=torch.long)
        if padding_mask is None:
            return offset + torch.arange(seqlen, device=device)
        # Pads get the position of the next real token minus one (clamped at 0): any finite value
        # does, since pad keys are masked and pad outputs are ignored.
        return offset + (padding_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, d_model] -> y [B, L, d_model].

        With a cache, the new keys / values are written at positions [length, length + L) and the
        queries attend over every filled position (a prefill, a part of one, or a decoding step).
        Gradients flow through the keys / values of this call; across calls the cache is a constant.
        """
        self._check(x, cache, padding_mask)
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)

        if self.rope:
            positions = self._positions(batch, seqlen, x.device, cache, padding_mask)
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, compute)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        start = 0 if cache is None else cache.length
        key_valid = padding_mask  # [B, L_k] or None (all real)
        if cache is not None:
            k, v, key_valid = self._update_cache(cache, k, v, padding_mask)

        if padding_mask is None and start == 0:
            # No pads and no earlier keys: plain causal attention, the fast (flash) path.
            attn_mask, is_causal = None, True
        else:
            attn_mask, is_causal = self._mask(key_valid, start, seqlen, x.device), False
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(batch, seqlen, self.n_heads * self.head_dim)
        return self.o_proj(y)

    def _update_cache(
        self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, L, hd] at [length, length + L); return the filled keys, values, valid."""
        start, end = cache.length, cache.length + k.shape[2]
        cached_k, cached_v = cache.key[:, :, :start], cache.value[:, :, :start]
        cache.key[:, :, start:end] = k.detach()
        cache.value[:, :, start:end] = v.detach()
        cache.valid[:, start:end] = True if padding_mask is None else padding_mask
        cache.length = end
        key_valid = cache.valid[:, :end]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Keep this call differentiable: attend over (cached, new) rather than the cache buffer.
            k = torch.cat([cached_k.to(k.dtype), k], dim=2)
            v = torch.cat([cached_v.to(v.dtype), v], dim=2)
            return k, v, key_valid
        return cache.key[:, :, :end], cache.value[:, :, :end], key_valid

    @staticmethod
    def _mask(key_valid: torch.Tensor | None, start: int, seqlen: int, device: torch.device) -> torch.Tensor:
        """Boolean attention mask [B or 1, 1, L, start + L] (True = attend).

        Query i sits at absolute position start + i and sees keys at positions <= start + i that are
        real. It always sees its own key: for a pad query this is the only key left, and it keeps the
        softmax row from being all -inf (NaN); for a real query its own key is allowed anyway.
        """
        total = start + seqlen
        query_pos = torch.arange(start, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        causal = key_pos <= query_pos  # [L, L_k]
        if key_valid is None:
            return causal[None, None]
        mask = causal[None] & key_valid[:, None, :]
        mask = mask | (key_pos == query_pos)[None]
        return mask[:, None]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, rope={self.rope}")
