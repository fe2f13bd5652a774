"""Mamba-2 mixer (SSD), as ``mamba_ssm.modules.mamba2.Mamba2`` without its MLP branch (d_mlp = 0).

    x [B, L, d_model]
      -> in_proj -> z [d_inner] | xBC [conv_dim] | dt [nheads]
      xBC -> causal depthwise conv1d (width d_conv) -> SiLU -> x [d_inner] | B [G*N] | C [G*N]
      y = SSD(x as [H, P], dt, A = -exp(A_log), B, C as [G, N], D, dt_bias, softplus, dt_limit)
      y = GatedRMSNorm(y, gate z) (groups of d_inner / ngroups features)
      -> out_proj -> [B, L, d_model]

with d_inner = expand * d_model, nheads = d_inner / headdim, conv_dim = d_inner + 2 * ngroups * d_state.
Parameter names and shapes are mamba_ssm's (and transformers' Mamba2Mixer's), so checkpoints load by
name. The scan and the conv run through :mod:`kernels.ssd` and :mod:`kernels.causal_conv1d`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.cache import ConvSSMCache, ssm_state_dtype_for
from core.config import Mamba2Config
from core.layers.norm import GatedRMSNorm
from core.layers.short_conv import masked_short_conv, ssm_A
from kernels.mamba_decode import mamba2_decode_unsupported
from kernels.ssd import ssd, ssd_step


class Mamba2(nn.Module):
    """The Mamba-2 mixer. forward: x [B, L, d_model] (any float dtype) -> y [B, L, d_model], x's dtype.

    ``dt_bias``, ``A_log`` [nheads] and ``D`` ([nheads], or [d_inner] with ``D_has_hdim``) are created in
    float32 whatever ``dtype`` says, as mamba_ssm does: they set decay rates, which bf16 rounds badly.
    """

    # One-token calls with a cache read only device state: capturable in a CUDA graph (core.cuda_graph).
    cuda_graph_safe = True

    def __init__(self, d_model: int, config: Mamba2Config, layer_idx: int = 0, norm_eps: float = 1e-5,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.config = config
        self.layer_idx = layer_idx
        self.d_inner = config.expand * d_model
        if self.d_inner % config.headdim != 0:
            raise ValueError(
                f"Mamba2: d_inner = expand * d_model = {config.expand} * {d_model} = {self.d_inner} is not a "
                f"multiple of headdim {config.headdim}; pick headdim dividing it (or change d_model / expand)"
            )
        self.nheads = self.d_inner // config.headdim
        if self.nheads % config.ngroups != 0:
            raise ValueError(
                f"Mamba2: ngroups {config.ngroups} must divide nheads {self.nheads} "
                f"(= d_inner {self.d_inner} / headdim {config.headdim}); each group of B/C serves nheads/ngroups heads"
            )
        if not 0 < config.A_init_min <= config.A_init_max:
            raise ValueError(f"Mamba2: need 0 < A_init_min <= A_init_max, got {config.A_init_min}, {config.A_init_max}")
        if not 0 < config.dt_min <= config.dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got {config.dt_min}, {config.dt_max}")
        self.headdim = config.headdim
        self.ngroups = config.ngroups
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.chunk_size = config.chunk_size
        self.dt_limit = (config.dt_limit_min, config.dt_limit_max)
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=config.bias, **factory)
        # padding = d_conv - 1 only so that the module alone matches mamba_ssm's; forward calls the kernel.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=config.conv_bias, **factory)

        # dt bias: dt log-uniform in [dt_min, dt_max], floored, through the inverse of softplus so that
        # softplus(dt_bias) starts at that dt.
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, device=device).uniform_(config.A_init_min, config.A_init_max)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner if config.D_has_hdim else self.nheads, device=device))
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True
        self.dt_bias._no_reinit = True

        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, group_size=self.d_inner // self.ngroups,
                                 norm_before_gate=config.norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias, **factory)

    def allocate_cache(self, batch_size: int, max_seqlen: int | None = None, device: torch.device | None = None,
                       dtype: torch.dtype | None = None, ssm_state_dtype: torch.dtype | None = None) -> ConvSSMCache:
        """Zero states: conv_state [B, conv_dim, d_conv - 1] (model dtype), ssm_state [B, nheads, headdim,
        d_state] (float32 by default; float64 for a float64 model; ``ssm_state_dtype``:
        core.cache.ssm_state_dtype_for)."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        state_dtype = ssm_state_dtype_for(dtype, ssm_state_dtype)
        return ConvSSMCache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=state_dtype),
        )

    def _D(self) -> torch.Tensor:
        return self.D.reshape(self.nheads, self.headdim) if self.config.D_has_hdim else self.D

    def forward(self, x: torch.Tensor, cache: ConvSSMCache | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_model]; cache: continue from it and leave the state after x in it (L == 1 is a
        decoding step); padding_mask bool [B, L], True at real tokens, False at left padding."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 expects x of shape [B, L, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if padding_mask is not None and tuple(padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"Mamba2: padding_mask must be bool [B, L] = {[batch, seqlen]}, "
                             f"got {tuple(padding_mask.shape)}")
        if cache is not None and cache.conv_state.shape[0] != batch:
            raise ValueError(f"Mamba2: the cache holds batch {cache.conv_state.shape[0]}, x has batch {batch}")

        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        keep = None if padding_mask is None else padding_mask.to(xBC.dtype).unsqueeze(-1)  # [B, L, 1]
        step = cache is not None and seqlen == 1
        xBC, conv_final = masked_short_conv(xBC, self.conv1d, keep, cache)

        xs, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        if keep is not None:
            # The conv output at a pad is silu(bias), not 0: zero the scan input so pads add nothing to the
            # state. A pad still decays the state, which is zero before the first real token.
            xs = xs * keep
        A, D = ssm_A(self), self._D()

        if step:
            y = ssd_step(cache.ssm_state, xs[:, 0].reshape(batch, self.nheads, self.headdim), dt[:, 0], A,
                         B[:, 0].reshape(batch, self.ngroups, self.d_state),
                         C[:, 0].reshape(batch, self.ngroups, self.d_state),
                         D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        else:
            result = ssd(xs.reshape(batch, seqlen, self.nheads, self.headdim), dt, A,
                         B.reshape(batch, seqlen, self.ngroups, self.d_state),
                         C.reshape(batch, seqlen, self.ngroups, self.d_state),
                         self.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
                         # A clone: the cache is overwritten below, after autograd may have saved its state.
                         initial_state=None if cache is None else cache.ssm_state.clone(),
                         return_final_state=cache is not None)
            if cache is not None:
                y, ssm_final = result
                cache.conv_state.copy_(conv_final)
                cache.ssm_state.copy_(ssm_final)
            else:
                y = result

        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def fused_step_unsupported(self) -> str | None:
        """Why the fused block step (:func:`kernels.mamba_decode.mamba2_decode_block`, triton backend)
        cannot run this layer; None when it can."""
        if self.config.norm_before_gate:
            return "norm_before_gate=True (the fused step gates before the grouped norm)"
        if self.in_proj.bias is not None or self.out_proj.bias is not None:
            return "in_proj / out_proj have biases, which the fused step does not add"
        weights = (self.in_proj.weight, self.conv1d.weight, self.out_proj.weight, self.norm.weight)
        if len({w.dtype for w in weights}) != 1 or len({w.device for w in weights}) != 1:
            return "the weights differ in dtype or device"
        return mamba2_decode_unsupported(self.d_model, self.d_inner, self.nheads, self.headdim, self.d_state,
                                         self.ngroups, self.d_conv, self.in_proj.weight.dtype)

    def fused_step_weights(self) -> dict:
        """This mixer's parameters as keyword arguments of :func:`kernels.mamba_decode.mamba2_decode_block`
        (views, no copies; A = -exp(A_log) memoized as the op-by-op step has it)."""
        return dict(in_proj_weight=self.in_proj.weight, conv_weight=self.conv1d.weight[:, 0],
                    conv_bias=self.conv1d.bias, dt_bias=self.dt_bias, A=ssm_A(self), D=self._D(),
                    dt_limit=self.dt_limit, gate_norm_weight=self.norm.weight, gate_norm_eps=self.norm.eps,
                    out_proj_weight=self.out_proj.weight)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"chunk_size={self.chunk_size}")
