"""Hyena: an independent reference written from safari's formulas, fftconv against a direct sum,
causality, prefill + steps, left padding, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import HyenaConfig
from core.layers.hyena import Hyena, fftconv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make(d_model=8, dtype=torch.float64, seed=0, **kwargs) -> Hyena:
    torch.manual_seed(seed)
    kwargs.setdefault("max_seqlen", 32)
    kwargs.setdefault("filter_order", 16)
    return Hyena(d_model, HyenaConfig(**kwargs), dtype=dtype)


def direct_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_{s <= t} k[..., t - s] u[..., s], term by term."""
    y = torch.zeros_like(u)
    for t in range(u.shape[-1]):
        for s in range(t + 1):
            y[..., t] = y[..., t] + k[..., t - s] * u[..., s]
    return y


def safari_filter(m: Hyena, seqlen: int) -> torch.Tensor:
    """safari's HyenaFilter.filter: complex-exponential positional embedding over l_max, the MLP
    (nn.Sequential with the shared Sin), then ExponentialModulation. Returns [seqlen, channels]."""
    fn = m.filter_fn
    l_max, emb_dim = fn.max_seqlen, fn.emb_dim
    t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]
    bands = (emb_dim - 1) // 2
    t_rescaled = torch.linspace(0, l_max - 1, l_max, dtype=torch.float64)[None, :, None]
    w = 2 * math.pi * t_rescaled / l_max
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]
    z = torch.exp(-1j * f * w)
    z = torch.cat([t, z.real, z.imag], dim=-1)[:, :seqlen]
    h = fn.implicit_filter(z.to(fn.implicit_filter[0].weight.dtype))
    if fn.modulate:
        max_decay = math.log(fn.target_decay) / fn.fast_decay_pct
        min_decay = math.log(fn.target_decay) / fn.slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, fn.channels, dtype=torch.float64)[None, None]
        h = h * torch.exp(-t[:, :seqlen] * deltas.abs())
    return h[0]


def reference_hyena(m: Hyena, x: torch.Tensor) -> torch.Tensor:
    """safari's HyenaOperator.forward (one head, one block) with direct convolutions."""
    seqlen, d = x.shape[1], m.d_model
    order = m.order
    u = m.in_proj(x).transpose(1, 2)
    uc = m.short_filter(u)[..., :seqlen]  # nn.Conv1d with padding W-1, cut to L: causal
    *xs, v = uc.split(d, dim=1)
    k = safari_filter(m, seqlen).T.reshape(d, order - 1, seqlen).permute(1, 0, 2)  # '(v o) l -> o v l'
    bias = m.filter_fn.bias.reshape(d, order - 1).T
    for o, x_i in enumerate(reversed(xs[1:])):
        v = v * x_i
        v = direct_conv(v, k[o]) + v * bias[o][:, None]
    return m.out_proj((v * xs[0]).transpose(1, 2))


@pytest.mark.parametrize("seqlen", [1, 2, 9])
def test_fftconv_equals_direct_convolution(seqlen):
    torch.manual_seed(0)
    u = torch.randn(2, 3, seqlen, dtype=torch.float64)
    k = torch.randn(3, seqlen, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    assert rel_err(fftconv(u, k, bias), direct_conv(u, k) + u * bias[:, None]) < 1e-12
    assert rel_err(fftconv(u, k), direct_conv(u, k)) < 1e-12
    # float32 inputs compute in float32 and come back float32.
    y32 = fftconv(u.float(), k.float(), bias.float())
    assert y32.dtype == torch.float32 and rel_err(y32.double(), fftconv(u, k, bias)) < 1e-5


@pytest.mark.parametrize("order", [2, 3])
def test_forward_and_grads_match_safari_reference(order):
    m = make(order=order)
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    y, ref = m(x), reference_hyena(m, x)
    assert rel_err(y, ref) < 1e-11
    w = torch.randn_like(y)
    params = [x] + [p for p in m.parameters()]
    got = torch.autograd.grad((y * w).sum(), params)
    expected = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, e in zip(names, got, expected):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert rel_err(g, e) < 1e-10, name


def test_filter_features_without_modulation_and_bias():
    m = make(modulate=False, filter_bias=False, filter_emb_dim=3, filter_layers=1)
    assert m.filter_fn.bias is None
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    h, bias = m.filters(6)
    assert bias is None and rel_err(h[0], safari_filter(m, 6).T) < 1e-12
    # Without the skip bias the long conv has no D term.
    u = m.short_filter(m.in_proj(x).transpose(1, 2))[..., :6]
    x0, x1, v = u.split(8, dim=1)
    expected = m.out_proj((direct_conv(v * x1, h[0]) * x0).transpose(1, 2))
    assert rel_err(m(x), expected) < 1e-11


def test_causal():
    m = make()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    y = m(x)
    for t0 in (0, 4, 9):
        x2 = x.clone()
        x2[:, t0:] += torch.randn_like(x2[:, t0:])
        y2 = m(x2)
        assert torch.equal(y2[:, :t0], y[:, :t0]) or rel_err(y2[:, :t0], y[:, :t0]) < 1e-13
        assert rel_err(y2[:, t0:], y[:, t0:]) > 1e-3


@pytest.mark.parametrize("order", [2, 3])
def test_forward_equals_prefill_plus_steps(order):
    m = make(order=order)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    full = m(x)
    with torch.no_grad():
        cache = m.allocate_cache(2, 12)
        assert len(cache.history) == order - 1
        parts = [m(x[:, :4], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
        assert cache.length == 9
        assert rel_err(torch.cat(parts, 1), full) < 1e-12
        # Steps from an empty cache, and a prefill split in parts.
        cache = m.allocate_cache(2, 9)
        parts = [m(x[:, :1], cache=cache), m(x[:, 1:2], cache=cache), m(x[:, 2:6], cache=cache),
                 m(x[:, 6:8], cache=cache), m(x[:, 8:], cache=cache)]
        assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_cached_call_is_differentiable_in_its_own_tokens():
    m = make()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 8, dtype=torch.float64)
    (gx,) = torch.autograd.grad((m(x) * w).sum(), x)
    cache = m.allocate_cache(2, 7)
    with torch.no_grad():
        m(x[:, :4], cache=cache)
    for start, stop in ((4, 6), (6, 7)):  # a prefill part, then a step
        xs = x[:, start:stop].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((m(xs, cache=cache) * w[:, start:stop]).sum(), xs)
        # Only the direct paths from x_t to outputs at t..stop count here; compare with the full
        # forward's gradient restricted the same way.
        x_full = x.detach().clone().requires_grad_(True)
        y_full = m(x_full)
        (g_full,) = torch.autograd.grad((y_full[:, start:stop] * w[:, start:stop]).sum(), x_full)
        assert rel_err(g, g_full[:, start:stop]) < 1e-12
    assert not cache.short_state.requires_grad and not cache.history[0].requires_grad


def test_decode_filter_memo_follows_parameter_updates():
    m = make()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        cache = m.allocate_cache(1, 8)
        m(x[:, :5], cache=cache)
        m.filter_fn.implicit_filter[0].weight.mul_(1.5)  # an optimizer step would do the same
        step = m(x[:, 5:], cache=cache)
        assert rel_err(step, m(x)[:, 5:]) < 1e-12


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[0] for r in rows)
    x = torch.randn(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype) * 5  # junk at pads
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, width - r.shape[0]:] = r
        mask[b, width - r.shape[0]:] = True
    return x, mask


@pytest.mark.parametrize("order", [2, 3])
def test_padded_batch_equals_alone(order):
    m = make(order=order)
    rows = [torch.randn(n, 8, dtype=torch.float64) for n in (8, 5, 1)]
    x, mask = left_pad(rows)
    y = m(x, padding_mask=mask)
    for b, r in enumerate(rows):
        assert rel_err(y[b, mask[b]], m(r[None])[0]) < 1e-12


@pytest.mark.parametrize("chunk", [None, 3, 1])  # 1: one-token chunks of pads take the decoding step
def test_padded_prefill_then_steps_equals_alone(chunk):
    m = make()
    lengths, new = [6, 2], 3
    rows = [torch.randn(n + new, 8, dtype=torch.float64) for n in lengths]
    x, mask = left_pad([r[:n] for r, n in zip(rows, lengths)])
    steps = torch.stack([r[n:] for r, n in zip(rows, lengths)])
    with torch.no_grad():
        cache = m.allocate_cache(2, x.shape[1] + new)
        chunk = chunk or x.shape[1]
        prefill = torch.cat([m(x[:, s:s + chunk], cache=cache, padding_mask=mask[:, s:s + chunk])
                             for s in range(0, x.shape[1], chunk)], dim=1)
        outs = torch.cat([m(steps[:, t:t + 1], cache=cache) for t in range(new)], dim=1)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        got = torch.cat([prefill[b, mask[b]], outs[b]])
        assert rel_err(got, m(r[None])[0]) < 1e-12


def test_length_errors():
    m = make(max_seqlen=8)
    m(torch.randn(1, 8, 8, dtype=torch.float64))  # exactly max_seqlen is fine
    with pytest.raises(ValueError, match="config.hyena.max_seqlen"):
        m(torch.randn(1, 9, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="config.hyena.max_seqlen"):
        m.allocate_cache(1, 9)
    cache = m.allocate_cache(1, 4)
    with torch.no_grad():
        m(torch.randn(1, 3, 8, dtype=torch.float64), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            m(torch.randn(1, 2, 8, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="order"):
        make(order=1)
    with pytest.raises(ValueError, match="filter_emb_dim"):
        make(filter_emb_dim=4)
    with pytest.raises(ValueError, match=r"x \[B, L, 8\]"):
        m(torch.randn(1, 3, 4, dtype=torch.float64))


def test_bf16_runs_and_stays_close():
    m = make(dtype=torch.float32)
    x = torch.randn(2, 12, 8)
    ref = m(x)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), ref) < 5e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_filter_and_fftconv_stay_float32_under_autocast():
    m = make(dtype=torch.float32)
    h, _ = m.filters(10)
    u = torch.randn(2, 8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_autocast, _ = m.filters(10)
        y = fftconv(u, h[0])
    assert h_autocast.dtype == torch.float32 and torch.equal(h_autocast, h)
    assert y.dtype == torch.float32 and torch.equal(y, fftconv(u, h[0]))


def test_step_reads_its_position_from_the_device_counter():
    """The step's position is ``cache.index`` (device), not the host length: stale history slots at and
    after it are ignored, and the counter advances in place."""
    m = make()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    full = m(x)
    with torch.no_grad():
        cache = m.allocate_cache(2, 8)
        m(x[:, :4], cache=cache)
        for buffer in cache.history:
            buffer[..., 4:] = 1e3  # junk where the steps have not written yet
        steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in (4, 5)], dim=1)
    assert rel_err(steps, full[:, 4:]) < 1e-12
    assert cache.index.tolist() == [6] and cache.length == 6
