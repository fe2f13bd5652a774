"""Attention: an explicit per-query reference, the KV cache, left padding, RoPE against Llama, errors."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import AttentionConfig
from core.layers.attention import Attention, decode_attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make(d_model=16, dtype=torch.float64, seed=0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    return Attention(d_model, AttentionConfig(**kwargs), dtype=dtype)


def naive_attention(m: Attention, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query at a time: scores over the earlier real keys, softmax, weighted values; RoPE written
    out pair by pair. Outputs at pad positions are left at zero."""
    batch, seqlen, _ = x.shape
    hd, n_heads, n_kv = m.head_dim, m.n_heads, m.n_kv_heads
    q = m.q_proj(x).view(batch, seqlen, n_heads, hd)
    k = m.k_proj(x).view(batch, seqlen, n_kv, hd)
    v = m.v_proj(x).view(batch, seqlen, n_kv, hd)
    real = torch.ones(batch, seqlen, dtype=torch.bool) if padding_mask is None else padding_mask

    def rope(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = vec.clone()
        half = hd // 2
        for i in range(half):
            angle = pos * m.rope_theta ** (-2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            out[..., i] = vec[..., i] * c - vec[..., i + half] * s
            out[..., i + half] = vec[..., i + half] * c + vec[..., i] * s
        return out

    rows = []
    for b in range(batch):
        positions = (real[b].long().cumsum(0) - 1).tolist()
        outs = torch.zeros(seqlen, n_heads, hd, dtype=x.dtype)
        for i in range(seqlen):
            if not real[b, i]:
                continue
            keys = [j for j in range(i + 1) if real[b, j]]
            for h in range(n_heads):
                g = h // (n_heads // n_kv)
                qi = rope(q[b, i, h], positions[i]) if m.rope else q[b, i, h]
                kj = torch.stack([rope(k[b, j, g], positions[j]) if m.rope else k[b, j, g] for j in keys])
                probs = torch.softmax(kj @ qi / math.sqrt(hd), dim=0)
                outs[i, h] = probs @ v[b, keys, g]
        rows.append(outs.reshape(seqlen, n_heads * hd))
    y = m.o_proj(torch.stack(rows))
    return y * real[..., None]


CONFIGS = [
    dict(n_heads=4),
    dict(n_heads=4, n_kv_heads=2, rope=True),
    dict(n_heads=4, n_kv_heads=1, rope=True, rope_theta=500.0, qkv_bias=True, out_bias=True),
    dict(n_heads=2, head_dim=6, rope=True),  # head_dim * n_heads != d_model
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_and_grads_match_naive_reference(cfg):
    m = make(**cfg)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = naive_attention(m, x)
    assert rel_err(y, ref) < 1e-12
    w = torch.randn_like(y)
    gx, gq = torch.autograd.grad((y * w).sum(), (x, m.q_proj.weight))
    rx, rq = torch.autograd.grad((ref * w).sum(), (x, m.q_proj.weight))
    assert rel_err(gx, rx) < 1e-12 and rel_err(gq, rq) < 1e-12


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_forward_equals_prefill_plus_steps(cfg):
    m = make(**cfg)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = m(x)
    with torch.no_grad():
        # Whole prefill, then steps.
        cache = m.allocate_cache(2, 12)
        parts = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
        assert cache.length == 9
        assert rel_err(torch.cat(parts, 1), full) < 1e-12
        # A prefill split in parts (3 + 1 + 4), then one step.
        cache = m.allocate_cache(2, 9)
        parts = [m(x[:, :3], cache=cache), m(x[:, 3:4], cache=cache), m(x[:, 4:8], cache=cache),
                 m(x[:, 8:], cache=cache)]
        assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_seqlen_one_and_odd_lengths():
    m = make(n_heads=4, n_kv_heads=2, rope=True)
    for seqlen in (1, 5):
        x = torch.randn(3, seqlen, 16, dtype=torch.float64)
        assert rel_err(m(x), naive_attention(m, x)) < 1e-12


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad [L_i, D] rows with random junk (not zeros: pads must be ignored, whatever they hold)."""
    width = max(r.shape[0] for r in rows)
    x = torch.randn(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype) * 5
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, width - r.shape[0]:] = r
        mask[b, width - r.shape[0]:] = True
    return x, mask


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_padded_batch_equals_alone(cfg):
    m = make(**cfg)
    lengths = [7, 4, 1]
    rows = [torch.randn(n, 16, dtype=torch.float64) for n in lengths]
    x, mask = left_pad(rows)
    y = m(x, padding_mask=mask)
    assert torch.isfinite(y).all()  # pad queries see only their own key: no NaN rows
    for b, r in enumerate(rows):
        alone = m(r[None])[0]
        assert rel_err(y[b, mask[b]], alone) < 1e-12
    # The explicit reference agrees on the real positions too.
    ref = naive_attention(m, x, mask)
    assert rel_err(y * mask[..., None], ref) < 1e-12


@pytest.mark.parametrize("chunk", [None, 3, 1])  # 1: one-token chunks of pads take the decoding step
def test_padded_prefill_then_steps_equals_alone(chunk):
    """generate()'s use: a left-padded prefill (whole or in chunks) with the mask, then unmasked steps."""
    m = make(n_heads=4, n_kv_heads=2, rope=True)
    lengths, new = [6, 2], 3
    rows = [torch.randn(n + new, 16, dtype=torch.float64) for n in lengths]
    x, mask = left_pad([r[:n] for r, n in zip(rows, lengths)])
    steps = torch.stack([r[n:] for r, n in zip(rows, lengths)])  # [B, new, D]
    with torch.no_grad():
        cache = m.allocate_cache(2, x.shape[1] + new)
        chunk = chunk or x.shape[1]
        prefill = torch.cat([m(x[:, s:s + chunk], cache=cache, padding_mask=mask[:, s:s + chunk])
                             for s in range(0, x.shape[1], chunk)], dim=1)
        outs = [m(steps[:, t:t + 1], cache=cache) for t in range(new)]
    assert torch.isfinite(prefill).all()
    for b, (r, n) in enumerate(zip(rows, lengths)):
        alone = m(r[None])[0]
        got = torch.cat([prefill[b, mask[b]], torch.cat(outs, 1)[b]])
        assert rel_err(got, alone) < 1e-12


def test_cached_call_is_differentiable_in_its_own_tokens():
    m = make(n_heads=4, n_kv_heads=2, rope=True)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 16, dtype=torch.float64)
    (gx,) = torch.autograd.grad((m(x)[:, 4:] * w).sum(), x)
    cache = m.allocate_cache(2, 7)
    with torch.no_grad():
        m(x[:, :4], cache=cache)
    x2 = x[:, 4:].detach().clone().requires_grad_(True)
    y2 = m(x2, cache=cache)
    (g2,) = torch.autograd.grad((y2 * w).sum(), x2)
    assert rel_err(g2, gx[:, 4:]) < 1e-12


def test_llama_attention_cross_check():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, attention_bias=False,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = LlamaAttention(config, layer_idx=0).float().eval()
    ours = Attention(32, AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, rope=True, rope_theta=1000.0))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 32)
    positions = torch.arange(11)[None].expand(2, -1)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    causal = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    expected, _ = theirs(x, position_embeddings=(cos, sin), attention_mask=causal)
    assert rel_err(ours(x), expected) <= 1e-4


def test_cache_overflow_and_mismatch_errors():
    m = make(n_heads=4)
    cache = m.allocate_cache(2, 5)
    with torch.no_grad():
        m(torch.randn(2, 4, 16, dtype=torch.float64), cache=cache)
        with pytest.raises(ValueError, match="max_seqlen=5"):
            m(torch.randn(2, 2, 16, dtype=torch.float64), cache=cache)
        m(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache)  # exactly full is fine
        with pytest.raises(ValueError, match="overflow"):
            m(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            m(torch.randn(3, 1, 16, dtype=torch.float64), cache=m.allocate_cache(2, 5))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="must divide n_heads"):
        Attention(16, AttentionConfig(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="head_dim explicitly"):
        Attention(18, AttentionConfig(n_heads=4))
    with pytest.raises(ValueError, match="even head_dim"):
        Attention(12, AttentionConfig(n_heads=4, rope=True))
    m = make(n_heads=4)
    with pytest.raises(ValueError, match=r"x \[B, L, 16\]"):
        m(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="padding_mask"):
        m(torch.randn(2, 3, 16, dtype=torch.float64), padding_mask=torch.ones(2, 3))


def test_bf16_runs_and_stays_close():
    m = make(n_heads=4, n_kv_heads=2, rope=True, dtype=torch.float32)
    x = torch.randn(2, 6, 16)
    ref = m(x)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), ref) < 3e-2


@pytest.mark.parametrize("seqlen", [10, 384])  # 384: the weighted sum split in blocks of 128
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_decode_attention_equals_sdpa_over_the_valid_keys(n_kv, seqlen):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    key, value = torch.randn(2, 3, n_kv, seqlen, 8, dtype=torch.float64)
    mask = torch.rand(3, seqlen) < 0.6
    mask[:, 0] = True
    got = decode_attention(q, key, value, mask)
    group = 4 // n_kv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
        attn_mask=mask[:, None, None, :])[:, :, 0]
    assert rel_err(got, ref) < 1e-12
    # Whatever the masked slots hold (finite) does not matter.
    key2 = key.masked_fill(~mask[:, None, :, None], 1e3)
    assert rel_err(decode_attention(q, key2, value, mask), ref) < 1e-12


def test_step_counters_and_the_grad_enabled_step():
    """The decoding step keeps the device counters; with autograd on, a one-token call takes the general
    path, which is differentiable in its own key and value and gives the same output."""
    m = make(n_heads=4, n_kv_heads=2, rope=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    with torch.no_grad():
        cache = m.allocate_cache(2, 7)
        m(x[:, :5], cache=cache, padding_mask=mask)
        assert cache.positions.tolist() == [5, 3] and cache.fill.tolist() == [5] and cache.has_padding
        stepped = m(x[:, 5:], cache=cache)
        assert cache.positions.tolist() == [6, 4] and cache.fill.tolist() == [6] and cache.length == 6
        assert cache.valid[:, 5].all()
        graded_cache = m.allocate_cache(2, 7)
        m(x[:, :5], cache=graded_cache, padding_mask=mask)
    x5 = x[:, 5:].clone().requires_grad_(True)
    graded = m(x5, cache=graded_cache)
    assert rel_err(graded.detach(), stepped) < 1e-12
    assert graded_cache.positions.tolist() == [6, 4] and graded_cache.fill.tolist() == [6]
    (grad,) = torch.autograd.grad(graded.sum(), x5)
    assert grad.abs().sum() > 0
