"""Causal softmax attention: multi-head or grouped-query, optional rotary embeddings, a KV cache.

Parameter names are Llama's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so a Llama attention
layer's weights load by name. The attention itself is ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels on GPU, the math kernel on CPU).

Positions and padding. ``padding_mask`` (bool [B, L], True = real token) marks left padding of
unequal prompts. Pad keys are masked out and rotary positions count from each row's first real token,
so the outputs at real positions equal those of the row run alone. The KV cache records which of its
positions are real (``KVCache.valid``), so later chunks and decoding steps keep masking the pads and
keep counting positions per row.

Decoding. A one-token call with a cache (and autograd off: generation) takes a separate path that is
safe to capture in a CUDA graph: the per-token quantities live in the cache's device tensors
(``KVCache.counters``: each row's rotary position and the write slot), the new key and value are written
with ``index_copy_`` at that slot, and the query attends over the whole preallocated buffer with the
validity mask (:func:`decode_attention`: grouped-query matmuls with float32 scores, no copy of the
cache). The work per token is O(max_seqlen), which is why caches are allocated to prompt + new tokens.
q, k and v come from one matmul with the three weights concatenated once (``decode_memo``).

Rotary embeddings use the rotate-half convention of Llama / transformers: the head dimension splits into
halves (x1, x2), and ``rope(x) = x * cos + cat(-x2, x1) * sin`` with angles ``pos * theta^(-2i/head_dim)``
repeated over both halves. Angles are computed in float64 and applied in float32 (float64 for float64
inputs), then cast back, so long positions keep their precision whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from core.cache import KVCache, decode_memo
from core.config import AttentionConfig


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The rotary frequencies ``theta^(-2i/head_dim)``, float64 [head_dim / 2]."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    return theta ** (-exponents)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer ``positions`` [B, L]: each [B, 1, L, head_dim] in ``dtype``.

    ``inv_freq`` (from :func:`rotary_inv_freq`) can be passed precomputed; the values are the same.
    """
    if inv_freq is None:
        inv_freq = rotary_inv_freq(head_dim, theta, positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, L, head_dim] by the tables of :func:`rotary_cos_sin`; returns x's dtype."""
    xc = x.to(cos.dtype)
    x1, x2 = xc.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)


_BMM_OUT_DTYPE: dict[tuple, bool] = {}


def _bmm_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a [N, M, K] @ b [N, K, P] with float32 results (float64 for float64 inputs).

    Half-precision inputs on CUDA use the matmul's own float32 output (``torch.bmm(..., out_dtype=)``,
    torch >= 2.8), so the cache is read once and never copied; elsewhere the inputs are upcast. Whether
    the running torch takes a layout is learned on its first (eager, before any graph capture) call.
    """
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        layout = (a.device, a.dtype, a.is_contiguous(), b.is_contiguous(), b.transpose(1, 2).is_contiguous())
        supported = _BMM_OUT_DTYPE.get(layout)
        if supported is not False:
            try:
                out = torch.bmm(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                if supported:  # it worked for this layout before: a real error
                    raise
                _BMM_OUT_DTYPE[layout] = False
            else:
                _BMM_OUT_DTYPE[layout] = True
                return out
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.bmm(a.to(compute), b.to(compute))


def decode_attention(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """One query per head against a whole preallocated KV buffer: the decoding step's attention.

    q [B, n_heads, head_dim]; key, value [B, n_kv_heads, S, head_dim] (the cache buffers); mask bool
    [B, S] (True = attend; every row needs at least one True). Returns [B, n_heads, head_dim] in q's
    dtype. Query head h uses key/value head h // (n_heads / n_kv_heads), as grouped-query attention.
    Scores, softmax and the weighted sum in float32 (float64 for float64 inputs); the cost is O(S)
    whatever the number of filled slots, and nothing depends on it, so the step is capturable in a CUDA
    graph. The result depends on S only through masked (zero-weight) slots, but the order of the float
    additions depends on S: equal S gives bitwise equal results.
    """
    batch, n_heads, head_dim = q.shape
    n_kv, seqlen = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    scale = head_dim**-0.5 if scale is None else scale
    # The g query heads of a group become g rows against their one key head: no repeat of the cache.
    q3 = q.reshape(batch * n_kv, group, head_dim).to(key.dtype)
    scores = _bmm_float(q3, key.reshape(batch * n_kv, seqlen, head_dim).transpose(1, 2))
    scores = scores.view(batch, n_kv, group, seqlen)
    scores = torch.where(mask[:, None, None, :], scores * scale, float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)  # [B, n_kv, g, S]
    # probs @ values reduces over all S slots into a few outputs per head: as one matmul it would give
    # a GPU only B * n_kv blocks of work. Split S into blocks (a matmul each, batched), then add the
    # partial sums in float32: the work spreads over B * n_kv * S / block.
    block = next((b for b in (1024, 512, 256, 128) if seqlen % b == 0 and seqlen > b), seqlen)
    splits = seqlen // block
    parts = probs.view(batch * n_kv, group, splits, block).transpose(1, 2)
    parts = parts.reshape(batch * n_kv * splits, group, block)
    y = _bmm_float(parts, value.reshape(batch * n_kv * splits, block, head_dim))
    y = y.view(batch * n_kv, splits, group, head_dim).sum(dim=1)
    return y.view(batch, n_heads, head_dim).to(q.dtype)


class Attention(nn.Module):
    """Causal MHA / GQA with optional RoPE and a preallocated KV cache.

    x [B, L, d_model] (any float dtype) -> y [B, L, d_model] (same dtype). ``n_kv_heads`` key/value heads
    are shared by groups of ``n_heads // n_kv_heads`` query heads (GQA; MQA when it is 1).
    """

    # One-token calls with a cache read only device state: capturable in a CUDA graph (core.cuda_graph).
    cuda_graph_safe = True

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
            counters=torch.zeros(batch_size + 1, device=device, dtype=torch.long),
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
        if cache is not None:
            offset = cache.positions[:, None]  # the cache counts each row's real tokens
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
        A one-token call with a cache and autograd off is a decoding step (:meth:`_step`, capturable
        in a CUDA graph); with autograd on it takes the general path, which keeps its own key and value
        differentiable.
        """
        self._check(x, cache, padding_mask)
        batch, seqlen, _ = x.shape
        if cache is not None and seqlen == 1 and not torch.is_grad_enabled():
            return self._step(x, cache, padding_mask)
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)

        if self.rope:
            positions = self._positions(batch, seqlen, x.device, cache, padding_mask)
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, compute)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        start = 0 if cache is None else cache.length
        earlier_pads = cache is not None and cache.has_padding
        key_valid = padding_mask  # [B, L_k] or None (all real)
        if cache is not None:
            k, v, key_valid = self._update_cache(cache, k, v, padding_mask)

        if padding_mask is None and start == 0:
            # No pads and no earlier keys: plain causal attention, the fast (flash) path.
            attn_mask, is_causal = None, True
        elif padding_mask is None and not earlier_pads and x.is_cuda:
            # A later chunk of an unpadded prefill: causal with the diagonal aligned to the last key
            # (lower right), which the fused kernels take without a materialized [L, start + L] mask.
            attn_mask, is_causal = causal_lower_right(seqlen, start + seqlen), False
        else:
            attn_mask, is_causal = self._mask(key_valid, start, seqlen, x.device), False
        k, v = k.to(q.dtype), v.to(q.dtype)
        grouped = self.n_kv_heads != self.n_heads
        if grouped and seqlen > 1 and (q.dtype not in (torch.float16, torch.bfloat16) or attn_mask is not None):
            # Only the flash kernel takes grouped K/V, and it needs fp16/bf16 without a mask; anything else
            # would fall back to the math kernel and hold [B, H, L, L] scores. The memory-efficient kernel
            # takes fp32 and masks once K/V have every head. (A decoding step, L == 1, has no such cost.)
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            grouped = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=grouped)
        y = y.transpose(1, 2).reshape(batch, seqlen, self.n_heads * self.head_dim)
        return self.o_proj(y)

    def _update_cache(
        self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, L, hd] at [length, length + L); return the filled keys, values, valid."""
        seqlen = k.shape[2]
        start, end = cache.length, cache.length + seqlen
        cached_k, cached_v = cache.key[:, :, :start], cache.value[:, :, :start]
        cache.key[:, :, start:end] = k.detach()
        cache.value[:, :, start:end] = v.detach()
        cache.valid[:, start:end] = True if padding_mask is None else padding_mask
        cache.positions.add_(seqlen if padding_mask is None else padding_mask.sum(dim=-1))
        cache.fill.fill_(end)
        cache.length = end
        cache.has_padding = cache.has_padding or padding_mask is not None
        key_valid = cache.valid[:, :end]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Keep this call differentiable: attend over (cached, new) rather than the cache buffer.
            k = torch.cat([cached_k.to(k.dtype), k], dim=2)
            v = torch.cat([cached_v.to(v.dtype), v], dim=2)
            return k, v, key_valid
        return cache.key[:, :, :end], cache.value[:, :, :end], key_valid

    def _qkv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v projection weights (and biases) stacked, for one matmul per decoding step; computed
        once and reused until a projection changes (:func:`core.cache.decode_memo`)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weights = [p.weight for p in projections]
        weight = decode_memo(self, "qkv_weight", weights, lambda: torch.cat(weights, dim=0))
        if self.q_proj.bias is None:
            return weight, None
        biases = [p.bias for p in projections]
        return weight, decode_memo(self, "qkv_bias", biases, lambda: torch.cat(biases, dim=0))

    def _step(self, x: torch.Tensor, cache: KVCache, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """One token per row, x [B, 1, d_model] -> [B, 1, d_model], safe to capture in a CUDA graph.

        Reads the row positions and the write slot from ``cache.counters`` and advances them in place;
        no Python value depends on the cache's contents. ``padding_mask`` [B, 1] (a one-token chunk of a
        padded prefill) marks pad rows: their key is stored as invalid and their query sees only itself.
        """
        batch = x.shape[0]
        hd, n_q, n_kv = self.head_dim, self.n_heads, self.n_kv_heads
        weight, bias = self._qkv_params()
        qkv = F.linear(x[:, 0], weight, bias)  # [B, (n_q + 2 n_kv) hd]
        qk = qkv[:, : (n_q + n_kv) * hd].reshape(batch, n_q + n_kv, 1, hd)
        v = qkv[:, (n_q + n_kv) * hd:].reshape(batch, n_kv, 1, hd)
        if self.rope:
            # Queries and keys rotate together (same tables, one pass).
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            inv_freq = decode_memo(self, "inv_freq", [self.q_proj.weight],
                                   lambda: rotary_inv_freq(hd, self.rope_theta, x.device))
            cos, sin = rotary_cos_sin(cache.positions[:, None], hd, self.rope_theta, compute, inv_freq)
            qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, :n_q, 0], qk[:, n_q:]

        fill = cache.fill
        cache.key.index_copy_(2, fill, k.to(cache.key.dtype))
        cache.value.index_copy_(2, fill, v.to(cache.value.dtype))
        if padding_mask is None:
            cache.valid.index_fill_(1, fill, True)
            mask = cache.valid
        else:
            keep = padding_mask[:, :1]
            cache.valid.index_copy_(1, fill, keep)
            mask = cache.valid.index_fill(1, fill, True)  # a pad query sees its own key only: no NaN
            cache.has_padding = True
        y = decode_attention(q, cache.key, cache.value, mask)  # [B, n_q, hd]

        if padding_mask is None:
            cache.counters.add_(1)  # every row's position and the write slot, one kernel
        else:
            cache.positions.add_(keep[:, 0].long())
            cache.fill.add_(1)
        cache.length += 1
        return self.o_proj(y.reshape(batch, 1, n_q * hd))

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
