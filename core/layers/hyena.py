"""Hyena operator (Poli et al. 2023) as in HazyResearch/safari and HyenaDNA, with O(L) decoding.

For order N (default 2), width D and a sequence of length L:

    u = in_proj(x)                                      [B, L, (N+1) D]
    u = short_filter(u)                                 depthwise causal conv, width short_filter_order
    x_0, ..., x_{N-1}, v = split(u)                     N+1 chunks of D channels
    for o = 0 .. N-2 (gates x_{N-1}, ..., x_1, safari's order):
        v = v * x_{N-1-o}
        v = (h_o * v) + bias_o * v                      causal long convolution over the whole sequence
    y = out_proj(v * x_0)

so there are N - 1 long convolutions, each with its own filter h_o [D, L] and per-channel bias_o (the
"D" skip term). The filters are implicit (``filter_fn``): a small MLP with sine activations maps
positional features of each position to N-1 filter values per channel, times an exponential decay
window. Everything about the filter is indexed by the absolute position 0 .. max_seqlen-1, so the long
convolution is time invariant: h depends on the lag only.

The long convolutions run as FFTs padded to 2L (``torch.fft.rfft(n=2L)``) in float32 (float64 for
float64 inputs), with outputs cast back to the input dtype between orders, as safari does.

Decoding. :class:`core.cache.HyenaCache` keeps the short conv's last inputs and the history of every
long-convolution input. A step computes each long-convolution output at the new position t as
``sum_{s<t} h[t-s] v[s] + (h[0] + bias) v[t]``: the history buffer times the filter gathered at the lags
``t - s`` (zero weight at and after t), so the step has the same shapes at every position and reads
t from the cache's device counter (``HyenaCache.index``): it is capturable in a CUDA graph. Its cost is
O(cache capacity) per token. A prefill writes the history and convolves over (history, new inputs) with
the FFT. Note the cache holds N - 1 history buffers, one per long convolution (safari's recurrence has
N - 1 of them).

Padding. With ``padding_mask`` (left padding) the projections are zeroed at pad positions before the
short conv, and every long-convolution input is zeroed there, so the real tokens of a left-padded row
see exactly what they see alone: zeros before their first token. Because the long convolution depends
on the lag only, the shift by the padding does not change their outputs.

Parameters as safari: ``in_proj``, ``short_filter`` (nn.Conv1d layout [C, 1, W], run through
``kernels.causal_conv1d``), ``filter_fn`` (``implicit_filter`` MLP, ``bias``), ``out_proj``. The
positional features and the decay rates are fixed functions of the config and are recomputed on the
fly in float64 rather than stored, so casting the model to bf16 cannot coarsen them (safari stores them;
it also trains the features with a learning rate of 1e-5, which we do not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.cache import HyenaCache, decode_memo
from core.config import HyenaConfig
from kernels.causal_conv1d import causal_conv1d, causal_conv1d_step


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fftconv(u: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal long convolution with a skip term, through FFTs padded to 2L.

    u [B, D, L] (any float dtype), k [D, L] (the filter, lag 0 first), bias [D] or None.
    Returns y [B, D, L] in u's dtype with ``y[:, d, t] = sum_{s<=t} k[d, t-s] u[:, d, s] + bias[d] u[:, d, t]``,
    computed in float32 (float64 for float64 inputs). Padding to 2L makes the circular FFT convolution
    linear, so nothing wraps around from the end of the sequence.
    """
    seqlen = u.shape[-1]
    if k.shape[-1] != seqlen:
        raise ValueError(f"fftconv: filter length {k.shape[-1]} differs from sequence length {seqlen}")
    dtype = compute_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):  # the precision is chosen here
        uc = u.to(dtype)
        n = 2 * seqlen
        y = torch.fft.irfft(torch.fft.rfft(uc, n=n) * torch.fft.rfft(k.to(dtype), n=n), n=n)[..., :seqlen]
        if bias is not None:
            y = y + uc * bias.to(dtype)[:, None]
    return y.to(u.dtype)


class Sin(nn.Module):
    """sin(freq * x) with a learnable frequency per feature (safari's filter activation)."""

    def __init__(self, dim: int, freq: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(freq), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq.to(x.dtype) * x)


class HyenaFilter(nn.Module):
    """Implicit long filter: h(t) = MLP(features(t)) * decay(t), over positions 0 .. max_seqlen - 1.

    features(t) (safari's PositionalEmbedding, emb_dim = 1 + 2 * bands): normalized time t / (max_seqlen
    - 1), then cos and -sin of ``f * 2 pi t / max_seqlen`` for ``bands`` frequencies f from 1e-4 to
    bands - 1. The MLP is Linear(emb_dim, filter_order), Sin, ``filter_layers`` times (Linear, Sin),
    Linear(filter_order, channels, no bias); all its Sin activations share one frequency vector, as in
    safari (the same module appears at each place). The decay window (safari's ExponentialModulation)
    is ``exp(-t |delta_c|)`` with rates from log(target)/slow_decay_pct to log(target)/fast_decay_pct
    across channels, so the fastest channel decays to ``target`` at fast_decay_pct of max_seqlen.

    ``forward(seqlen)`` -> h [seqlen, channels], float32 (float64 when the parameters are float64).
    ``bias`` [channels] is the skip term used by the convolution (None with ``filter_bias=False``).
    """

    def __init__(self, channels: int, config: HyenaConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if config.filter_emb_dim < 3 or config.filter_emb_dim % 2 == 0:
            raise ValueError(
                f"hyena.filter_emb_dim must be odd and >= 3 (time, then cos and sin bands), got "
                f"{config.filter_emb_dim}"
            )
        if config.filter_order < 1 or config.filter_layers < 0:
            raise ValueError(f"hyena.filter_order must be >= 1 and filter_layers >= 0, got "
                             f"{config.filter_order} and {config.filter_layers}")
        factory = {"device": device, "dtype": dtype}
        self.channels = channels
        self.max_seqlen = config.max_seqlen
        self.emb_dim = config.filter_emb_dim
        self.modulate = config.modulate
        self.fast_decay_pct = config.fast_decay_pct
        self.slow_decay_pct = config.slow_decay_pct
        self.target_decay = config.target_decay
        width = config.filter_order
        act = Sin(width, config.sine_freq, **factory)
        layers: list[nn.Module] = [nn.Linear(self.emb_dim, width, **factory), act]
        for _ in range(config.filter_layers):
            layers += [nn.Linear(width, width, **factory), act]
        layers.append(nn.Linear(width, channels, bias=False, **factory))
        self.implicit_filter = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.randn(channels, **factory)) if config.filter_bias else None
        # The filter is a function of position, not a weight matrix: no weight decay (safari: wd=0),
        # and a generic re-init (zeroing Linear biases) would change its shape, so it is left alone.
        for parameter in self.parameters():
            parameter._no_weight_decay = True
            parameter._no_reinit = True

    def positional_features(self, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """features [seqlen, emb_dim] and normalized time t [seqlen, 1], float64."""
        positions = torch.arange(seqlen, device=device, dtype=torch.float64)
        t = torch.linspace(0, 1, self.max_seqlen, device=device, dtype=torch.float64)[:seqlen, None]
        bands = (self.emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=torch.float64)
        angles = freqs * (2 * math.pi * positions / self.max_seqlen)[:, None]  # [seqlen, bands]
        return torch.cat([t, angles.cos(), -angles.sin()], dim=-1), t

    def decay(self, t: torch.Tensor) -> torch.Tensor:
        """The exponential window [seqlen, channels] at normalized times t [seqlen, 1]."""
        max_decay = math.log(self.target_decay) / self.fast_decay_pct
        min_decay = math.log(self.target_decay) / self.slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, self.channels, device=t.device, dtype=t.dtype)
        return torch.exp(-t * deltas.abs())

    def forward(self, seqlen: int) -> torch.Tensor:
        if seqlen > self.max_seqlen:
            raise ValueError(f"the Hyena filter is defined over {self.max_seqlen} positions, asked for "
                             f"{seqlen}; raise config.hyena.max_seqlen")
        weight = self.implicit_filter[0].weight
        dtype = compute_dtype(weight.dtype)
        features, t = self.positional_features(seqlen, weight.device)
        # float32 even under autocast: a bf16 filter MLP would blur neighbouring positions.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            h = features.to(dtype)
            for layer in self.implicit_filter:
                if isinstance(layer, nn.Linear):
                    bias = None if layer.bias is None else layer.bias.to(dtype)
                    h = F.linear(h, layer.weight.to(dtype), bias)
                else:
                    h = layer(h)
            if self.modulate:
                h = h * self.decay(t).to(dtype)
        return h


class Hyena(nn.Module):
    """The Hyena mixer (see the module docstring).

    x [B, L, d_model] (any float dtype, L <= config.max_seqlen) -> y [B, L, d_model] (same dtype).
    """

    # One-token calls with a cache read only device state: capturable in a CUDA graph (core.cuda_graph).
    cuda_graph_safe = True

    def __init__(
        self,
        d_model: int,
        config: HyenaConfig,
        layer_idx: int = 0,
        norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if config.order < 2:
            raise ValueError(f"hyena.order must be >= 2 (order 1 has no long convolution), got {config.order}")
        if config.short_filter_order < 1:
            raise ValueError(f"hyena.short_filter_order must be >= 1, got {config.short_filter_order}")
        if config.max_seqlen < 1:
            raise ValueError(f"hyena.max_seqlen must be >= 1, got {config.max_seqlen}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.order = config.order
        self.max_seqlen = config.max_seqlen
        inner = (config.order + 1) * d_model
        self.in_proj = nn.Linear(d_model, inner, **factory)
        # nn.Conv1d only to own the parameters in the usual layout; the conv runs in kernels.causal_conv1d.
        self.short_filter = nn.Conv1d(inner, inner, config.short_filter_order, groups=inner,
                                      padding=config.short_filter_order - 1, **factory)
        self.filter_fn = HyenaFilter(d_model * (config.order - 1), config, **factory)
        self.out_proj = nn.Linear(d_model, d_model, **factory)

    @property
    def n_long_convs(self) -> int:
        return self.order - 1

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HyenaCache:
        """short_state [B, (order+1) d_model, W-1] and order-1 histories [B, d_model, max_seqlen]."""
        if max_seqlen > self.max_seqlen:
            raise ValueError(
                f"a Hyena cache of max_seqlen={max_seqlen} exceeds the filter length "
                f"config.hyena.max_seqlen={self.max_seqlen}; raise config.hyena.max_seqlen or generate less"
            )
        weight = self.in_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        width = self.short_filter.weight.shape[-1]
        return HyenaCache(
            short_state=torch.zeros(batch_size, self.in_proj.out_features, width - 1, device=device, dtype=dtype),
            history=[torch.zeros(batch_size, self.d_model, max_seqlen, device=device, dtype=dtype)
                     for _ in range(self.n_long_convs)],
            length=0,
        )

    def filters(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The long filters h [order-1, d_model, seqlen] and skip biases [order-1, d_model] (or None).

        Channels are interleaved as in safari (filter channel c -> order c % (order-1), model channel
        c // (order-1)), so safari checkpoints keep their meaning.
        """
        h = self.filter_fn(seqlen).view(seqlen, self.d_model, self.n_long_convs).permute(2, 1, 0)
        return h, self.filters_bias()

    def filters_bias(self) -> torch.Tensor | None:
        """The skip biases [order-1, d_model] (or None), without evaluating the filter MLP."""
        bias = self.filter_fn.bias
        return None if bias is None else bias.view(self.d_model, self.n_long_convs).t()

    def _decode_filters(self, seqlen: int, capacity: int) -> torch.Tensor:
        """Filters for a cached prefill: without autograd, computed once over the cache's capacity and
        reused until a filter parameter changes (its version counter or storage moves)."""
        if torch.is_grad_enabled():
            return self.filters(seqlen)[0]
        params = list(self.filter_fn.implicit_filter.parameters())
        h = decode_memo(self, "filters", params, lambda: self.filters(capacity)[0], extra=(capacity,))
        return h[..., :seqlen]

    def _step_filters(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filters laid out for a decoding step: (h[0] [order-1, D], past [order-1, D, 2 capacity]).

        ``past[..., capacity + lag]`` is h[lag] for lags >= 1 and 0 for lags <= 0, so gathering it at
        ``capacity + t - s`` over the history slots s gives the weights of the earlier inputs of
        position t, with zeros at t and after (whatever those slots hold). Memoized like the prefill's.
        """
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            h = self.filters(capacity)[0]
            zeros = h.new_zeros(*h.shape[:-1], capacity + 1)
            return h[..., 0], torch.cat([zeros, h[..., 1:]], dim=-1)

        if torch.is_grad_enabled():
            return compute()
        params = list(self.filter_fn.implicit_filter.parameters())
        return decode_memo(self, "step_filters", params, compute, extra=(capacity,))

    def _check(self, x: torch.Tensor, cache: HyenaCache | None, padding_mask: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Hyena expects x [B, L, {self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != (batch, seqlen)):
            raise ValueError(
                f"padding_mask must be bool [B, L] = [{batch}, {seqlen}] (True = real token), got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        start = 0 if cache is None else cache.length
        if start + seqlen > self.max_seqlen:
            raise ValueError(
                f"Hyena got {start + seqlen} positions but its filter covers config.hyena.max_seqlen="
                f"{self.max_seqlen}; raise config.hyena.max_seqlen (or feed shorter sequences)"
            )
        if cache is None:
            return
        if not isinstance(cache, HyenaCache):
            raise TypeError(f"Hyena needs a HyenaCache (from allocate_cache), got {type(cache).__name__}")
        if cache.short_state.shape[0] != batch:
            raise ValueError(f"the Hyena cache holds batch {cache.short_state.shape[0]}, x has batch {batch}")
        capacity = cache.history[0].shape[-1]
        if start + seqlen > capacity:
            raise ValueError(
                f"Hyena cache overflow: it holds {start} of max_seqlen={capacity} positions and {seqlen} "
                f"more do not fit; allocate the cache with a larger max_seqlen"
            )

    def forward(
        self, x: torch.Tensor, cache: HyenaCache | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, d_model] -> y [B, L, d_model]; with a cache, continue from it and update it.

        Gradients flow through the new positions of a cached call; the cached history is a constant.
        """
        self._check(x, cache, padding_mask)
        batch, seqlen, _ = x.shape
        start = 0 if cache is None else cache.length
        end = start + seqlen
        keep = None if padding_mask is None else padding_mask[:, None, :]  # [B, 1, L]

        u = self.in_proj(x).transpose(1, 2)  # [B, (order+1) D, L]
        if keep is not None:
            u = u.masked_fill(~keep, 0)
        weight, conv_bias = self.short_filter.weight.squeeze(1), self.short_filter.bias
        if cache is None:
            u = causal_conv1d(u, weight, conv_bias)
        elif seqlen == 1:
            u = causal_conv1d_step(u[..., 0], cache.short_state, weight, conv_bias)[..., None]
            if cache.short_state.requires_grad:  # the step wrote the (differentiable) window into it
                cache.short_state.detach_()
        else:
            u, final_state = causal_conv1d(u, weight, conv_bias, initial_state=cache.short_state,
                                           return_final_state=True)
            cache.short_state.copy_(final_state.detach())
        *gates, v = u.split(self.d_model, dim=1)  # each [B, D, L]

        step = cache is not None and seqlen == 1
        if cache is None:
            h, bias = self.filters(seqlen)
        elif step:
            capacity = cache.history[0].shape[-1]
            h0, past = self._step_filters(capacity)
            slots = decode_memo(self, "slots", [], lambda: torch.arange(capacity, device=x.device),
                                extra=(capacity, x.device))
            # Filter weight of every history slot s for the new position t = cache.index: h[t - s].
            weights = past.index_select(-1, (cache.index + capacity) - slots)  # [order-1, D, capacity]
            bias = self.filters_bias()
        else:
            h = self._decode_filters(end, cache.history[0].shape[-1])
            bias = self.filters_bias()
        for o, gate in enumerate(reversed(gates[1:])):
            v = v * gate
            if keep is not None:
                v = v.masked_fill(~keep, 0)
            o_bias = None if bias is None else bias[o]
            if cache is None:
                v = fftconv(v, h[o], o_bias)
            elif step:
                v = self._step_long_conv(v, h0[o], weights[o], o_bias, cache.history[o], cache.index)
            else:
                v = self._cached_long_conv(v, h[o], o_bias, cache.history[o], start)
        if cache is not None:
            if step:
                cache.index.add_(1)
            else:
                cache.index.fill_(end)
            cache.length = end
        return self.out_proj((v * gates[0]).transpose(1, 2))

    @staticmethod
    def _step_long_conv(
        v: torch.Tensor, h0: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None,
        history: torch.Tensor, index: torch.Tensor,
    ) -> torch.Tensor:
        """One position t = ``index``: ``y_t = sum_{s<t} h[t-s] v_s + (h[0] + bias) v_t``; v_t is then
        written to the history at slot t.

        v [B, D, 1]; h0 [D] and weights [D, capacity] (h[t-s] at slot s, 0 from t on) in the compute
        dtype; history [B, D, capacity]; index int64 [1]. The new input enters separately from the
        history so that it stays differentiable. Returns [B, D, 1] in v's dtype.
        """
        dtype = weights.dtype
        vt = v[..., 0].to(dtype)
        y = (history.to(dtype) * weights).sum(-1) + h0 * vt
        if bias is not None:
            y = y + bias.to(dtype) * vt
        history.index_copy_(-1, index, v.detach().to(history.dtype))
        return y[..., None].to(v.dtype)

    @staticmethod
    def _cached_long_conv(
        v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Long conv of the new inputs v [B, D, L] (L > 1, a prefill) at positions [start, start + L) over
        the history.

        h [D, >= start + L] in the compute dtype; history [B, D, capacity] receives v.
        """
        end = start + v.shape[-1]
        past = history[..., :start]
        full = v if start == 0 else torch.cat([past.to(v.dtype), v], dim=-1)
        history[..., start:end] = v.detach()
        return fftconv(full, h[:, :end], bias)[..., start:]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, order={self.order}, max_seqlen={self.max_seqlen}"
