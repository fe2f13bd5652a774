"""S4D (Gu, Gupta, Goel, Re 2022): a diagonal linear time-invariant SSM, the mixer of SaShiMi's blocks.

Per channel h (``d_model`` channels, no input projection) and mode n (``d_state`` modes), with a step
``dt_h = exp(log_dt_h)`` and a fixed (input-independent) diagonal ``A_hn``:

    state_t = exp(dt A) state_{t-1} + (exp(dt A) - 1) / A * u_t       zero-order hold, B = 1
    y_t     = s * Re(sum_n C_n state_t,n) + D u_t                      s = 2 (complex) or 1 (real)
    out     = GLU(out_proj(GELU(y)))                                   SaShiMi's S4 block post-activation

Modes are complex (``mode="complex"``, S4D-Lin init ``A_n = -1/2 + i pi n``; each stands for a conjugate
pair, hence the factor 2) or real (``mode="real"``, S4D-Real init ``A_n = -(n + 1)``). B is fixed to 1:
with a diagonal state it only rescales C.

Because the dynamics do not depend on the input, the whole map u -> y is a causal convolution with the
kernel ``K_l = s Re(sum_n C_n dB_n dA_n^l)`` (``dA = exp(dt A)``, ``dB = (dA - 1) / A``): training runs
it as an FFT convolution padded to 2L, in O(L log L). Decoding runs the recurrence, O(d_state) per
channel and step. A prefill from a cached state adds the state's free response
``s Re(sum_n C_n dA_n^(t+1) state_n)`` to the convolution and writes the new state
``dA^L state + sum_j dA^(L-1-j) dB u_j``; so forward == prefill + steps (a test checks this).

The powers ``dA^l`` are computed as ``exp(l dt A)`` (no repeated products, so no error accumulation),
in position chunks of :data:`CHUNK` so that memory stays O(d_model d_state CHUNK).

Computation is float32 / complex64 (float64 / complex128 for float64 inputs); outputs have the input
dtype. Parameters ``log_dt`` [H], ``A_log`` [H, N] (``Re A = -exp(A_log)``), ``A_imag`` [H, N]
(complex mode), ``C`` [H, N, 2] (real, imaginary; [H, N] in real mode), ``D`` [H] are float32 and
carry ``_no_weight_decay``; ``out_proj`` is a Linear d_model -> 2 d_model (GLU) or d_model.

Padding: with ``padding_mask`` (left padding) the input is zeroed at pads, so the state is still zero
at a row's first real sample and its outputs equal those of the unpadded row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.config import S4DConfig

CHUNK = 1024  # positions per Vandermonde chunk: bounds memory at [H, N, CHUNK] complex numbers


@dataclass
class S4DCache:
    """S4D's decoding state: state complex64 [B, d_model, d_state] (complex128 for a float64 model; in
    real mode the imaginary part stays 0)."""

    state: torch.Tensor


def _compute_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    return (torch.float64, torch.complex128) if dtype == torch.float64 else (torch.float32, torch.complex64)


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution ``y_t = sum_{j<=t} k_{t-j} u_j``: u [B, H, L], k [H, L] real -> [B, H, L]."""
    length = u.shape[-1]
    n = 2 * length
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :length]


class S4D(nn.Module):
    """S4D mixer over ``d_model`` channels (docs/architecture.md's mixer interface)."""

    def __init__(self, d_model: int, config: S4DConfig, layer_idx: int = 0, norm_eps: float = 1e-5,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if config.mode not in ("complex", "real"):
            raise ValueError(f"s4d.mode must be 'complex' or 'real', got {config.mode!r}")
        if not isinstance(config.d_state, int) or config.d_state < 1:
            raise ValueError(f"s4d.d_state must be a positive int, got {config.d_state!r}")
        if not 0 < config.dt_min <= config.dt_max:
            raise ValueError(f"s4d.dt_min/dt_max: need 0 < dt_min <= dt_max, got {config.dt_min}, {config.dt_max}")
        self.d_model, self.d_state, self.layer_idx = d_model, config.d_state, layer_idx
        self.complex = config.mode == "complex"
        self.glu = config.glu
        h, n = d_model, config.d_state
        f32 = dict(device=device, dtype=torch.float32)
        self.log_dt = nn.Parameter(torch.empty(h, **f32))
        self.A_log = nn.Parameter(torch.empty(h, n, **f32))
        self.A_imag = nn.Parameter(torch.empty(h, n, **f32)) if self.complex else None
        self.C = nn.Parameter(torch.empty(h, n, 2, **f32) if self.complex else torch.empty(h, n, **f32))
        self.D = nn.Parameter(torch.empty(h, **f32))
        for p in (self.log_dt, self.A_log, self.A_imag, self.D):
            if p is not None:
                p._no_weight_decay = True
        self.out_proj = nn.Linear(h, 2 * h if self.glu else h, bias=True, device=device, dtype=dtype)
        self.dt_min, self.dt_max = config.dt_min, config.dt_max
        if not any(p.is_meta for p in self.parameters()):
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-Lin / S4D-Real init, dt log-uniform in [dt_min, dt_max], C ~ N(0, 1/2) per part, D ~ N(0, 1)."""
        h, n = self.d_model, self.d_state
        self.log_dt.copy_(torch.rand(h) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        if self.complex:
            self.A_log.fill_(math.log(0.5))
            self.A_imag.copy_(math.pi * torch.arange(n, dtype=torch.float32).expand(h, n))
            self.C.normal_(0.0, math.sqrt(0.5))
        else:
            self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(h, n))
            self.C.normal_(0.0, 1.0)
        self.D.normal_(0.0, 1.0)

    # ----------------------------------------------------------------------------------------------
    # The discretized system
    # ----------------------------------------------------------------------------------------------

    def _discrete(self, cdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dtA, dB, C) complex [H, N]: the exponent of dA = exp(dtA), ZOH input weight, output weight."""
        real = self.A_log.dtype if cdtype == torch.complex64 else torch.float64
        a_re = -torch.exp(self.A_log.to(real))
        a_im = self.A_imag.to(real) if self.complex else torch.zeros_like(a_re)
        A = torch.complex(a_re, a_im)
        dtA = torch.exp(self.log_dt.to(real))[:, None] * A
        dB = torch.expm1(dtA) / A if self.complex else torch.complex(torch.expm1(dtA.real) / a_re, torch.zeros_like(a_re))
        C = torch.view_as_complex(self.C.to(real).contiguous()) if self.complex else torch.complex(
            self.C.to(real), torch.zeros_like(a_re))
        return dtA, dB, C

    @property
    def _scale(self) -> float:
        return 2.0 if self.complex else 1.0

    def kernel(self, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The convolution kernel K [H, length] (float32; float64 for ``dtype=float64``)."""
        rdtype, cdtype = _compute_dtypes(dtype)
        dtA, dB, C = self._discrete(cdtype)
        weight = C * dB
        parts = []
        for start in range(0, length, CHUNK):
            pos = torch.arange(start, min(length, start + CHUNK), device=dtA.device, dtype=rdtype)
            powers = torch.exp(dtA[..., None] * pos)  # [H, N, chunk]
            parts.append(torch.einsum("hn,hnl->hl", weight, powers).real)
        return self._scale * torch.cat(parts, dim=-1)

    # ----------------------------------------------------------------------------------------------
    # Forward, prefill, step
    # ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, cache: S4DCache | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_model] -> [B, L, d_model]; with a cache, continue from and update its state."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"S4D expects x [B, L, {self.d_model}], got {tuple(x.shape)}")
        rdtype, cdtype = _compute_dtypes(x.dtype)
        u = x.to(rdtype)
        if padding_mask is not None:
            u = u * padding_mask[..., None].to(rdtype)
        if cache is not None and x.shape[1] == 1:
            y = self._step(u[:, 0], cache, cdtype)[:, None]
        else:
            y = self._convolve(u.transpose(1, 2), cache, rdtype, cdtype).transpose(1, 2)
        return self._post(y, x.dtype)

    def _post(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = self.out_proj(F.gelu(y).to(self.out_proj.weight.dtype))
        return (F.glu(out, dim=-1) if self.glu else out).to(dtype)

    def _convolve(self, u: torch.Tensor, cache: S4DCache | None, rdtype: torch.dtype,
                  cdtype: torch.dtype) -> torch.Tensor:
        """u [B, H, L] -> y [B, H, L] (before the post-activation); updates the cache's state."""
        length = u.shape[-1]
        y = fft_causal_conv(u, self.kernel(length, rdtype)) + self.D.to(rdtype)[:, None] * u
        if cache is None:
            return y
        dtA, dB, C = self._discrete(cdtype)
        h0 = cache.state.to(cdtype)
        new_state = torch.exp(dtA * length) * h0
        for start in range(0, length, CHUNK):
            stop = min(length, start + CHUNK)
            pos = torch.arange(start, stop, device=u.device, dtype=rdtype)
            # Free response of the cached state: s Re(sum_n C_n dA_n^(t+1) h0_n).
            free = torch.einsum("bhn,hnl->bhl", h0 * C, torch.exp(dtA[..., None] * (pos + 1))).real
            y[..., start:stop] += self._scale * free
            # The inputs' contribution to the final state: sum_j dA^(L-1-j) dB u_j.
            decay = torch.exp(dtA[..., None] * (length - 1 - pos)) * dB[..., None]
            new_state = new_state + torch.einsum("bhl,hnl->bhn", u[..., start:stop].to(cdtype), decay)
        self._store(cache, new_state)
        return y

    @staticmethod
    def _store(cache: S4DCache, state: torch.Tensor) -> None:
        if cache.state.requires_grad:  # differentiating through an initial state: keep the graph
            cache.state = state
        else:
            cache.state.copy_(state.to(cache.state.dtype))

    def _step(self, u: torch.Tensor, cache: S4DCache, cdtype: torch.dtype) -> torch.Tensor:
        """One sample: u [B, H] -> y [B, H]; the cache's state advances in place."""
        dtA, dB, C = self._discrete(cdtype)
        state = torch.exp(dtA) * cache.state.to(cdtype) + dB * u.to(cdtype)[..., None]
        self._store(cache, state)
        return self._scale * (state * C).sum(-1).real + self.D.to(u.dtype) * u

    def allocate_cache(self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> S4DCache:
        """A zero state; ``max_seqlen`` does not matter (the state has a fixed size)."""
        _, cdtype = _compute_dtypes(dtype or torch.float32)
        device = self.log_dt.device if device is None else device
        return S4DCache(state=torch.zeros(batch_size, self.d_model, self.d_state, device=device, dtype=cdtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, mode={'complex' if self.complex else 'real'}"
