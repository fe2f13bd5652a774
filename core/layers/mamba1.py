"""Mamba-1 mixer (S6), as ``mamba_ssm.modules.mamba_simple.Mamba``, with Jamba's optional inner norms.

    x [B, L, d_model]
      -> in_proj -> x [d_inner] | z [d_inner]
      x -> causal depthwise conv1d (width d_conv) -> SiLU
      x -> x_proj -> dt [dt_rank] | B [d_state] | C [d_state]
           (inner_norms: RMSNorm on each of dt, B, C, as transformers' JambaMambaMixer)
      dt -> dt_proj (weight only; its bias is the scan's delta_bias)
      y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_bias, softplus)   (y *= silu(z))
      -> out_proj -> [B, L, d_model]

with d_inner = expand * d_model and dt_rank = ceil(d_model / 16) unless given. Parameter names and
shapes are mamba_ssm's (and transformers' MambaMixer / JambaMambaMixer's), so checkpoints load by name.
The conv and the scan run through :mod:`kernels.causal_conv1d` and :mod:`kernels.selective_scan`, whose
initial and final states make prefill and one-token decoding exact continuations of each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.cache import ConvSSMCache, ssm_state_dtype_for
from core.config import Mamba1Config
from core.layers.norm import RMSNorm
from core.layers.short_conv import masked_short_conv, ssm_A
from kernels.mamba_decode import (conv_step_partials, linear_partials, linear_partials_splits,
                                  mamba1_decode_unsupported, mamba1_scan_step, mamba1_scan_step_backend,
                                  mamba1_scan_step_unsupported)
from kernels.selective_scan import selective_scan, selective_scan_step


class Mamba1(nn.Module):
    """The Mamba-1 mixer. forward: x [B, L, d_model] (any float dtype) -> y [B, L, d_model], x's dtype.

    ``A_log`` [d_inner, d_state], ``D`` [d_inner] and ``dt_proj.bias`` [d_inner] are created in float32
    whatever ``dtype`` says, as mamba_ssm does: they set the decay rates, which bf16 rounds badly. They
    carry ``_no_weight_decay``; the dt bias also ``_no_reinit`` (the backbone's init leaves it alone).
    """

    # One-token calls with a cache read only device state: capturable in a CUDA graph (core.cuda_graph).
    cuda_graph_safe = True

    def __init__(self, d_model: int, config: Mamba1Config, layer_idx: int = 0, norm_eps: float = 1e-5,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if config.dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba1: dt_init must be 'random' or 'constant', got {config.dt_init!r}")
        if not 0 < config.dt_min <= config.dt_max:
            raise ValueError(f"Mamba1: need 0 < dt_min <= dt_max, got {config.dt_min}, {config.dt_max}")
        self.d_model = d_model
        self.config = config
        self.layer_idx = layer_idx
        self.d_inner = config.expand * d_model
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.dt_rank = config.resolved_dt_rank(d_model)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=config.bias, **factory)
        # padding = d_conv - 1 only so that the module alone matches mamba_ssm's; forward calls the kernel.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
                                padding=self.d_conv - 1, bias=config.conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        if config.inner_norms:
            self.dt_layernorm = RMSNorm(self.dt_rank, eps=norm_eps, **factory)
            self.b_layernorm = RMSNorm(self.d_state, eps=norm_eps, **factory)
            self.c_layernorm = RMSNorm(self.d_state, eps=norm_eps, **factory)

        # dt_proj keeps dt's variance at init: weight uniform (or constant) at dt_rank^-0.5 * dt_scale.
        dt_init_std = self.dt_rank**-0.5 * config.dt_scale
        with torch.no_grad():
            if config.dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
        # dt bias: dt log-uniform in [dt_min, dt_max], floored, through the inverse of softplus so that
        # softplus(bias) starts at that dt.
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        self.dt_proj.bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A[d, n] = -(n + 1) for every channel.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        for param in (self.A_log, self.D, self.dt_proj.bias):
            param._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias, **factory)

    def allocate_cache(self, batch_size: int, max_seqlen: int | None = None, device: torch.device | None = None,
                       dtype: torch.dtype | None = None, ssm_state_dtype: torch.dtype | None = None) -> ConvSSMCache:
        """Zero states: conv_state [B, d_inner, d_conv - 1] (model dtype), ssm_state [B, d_inner, d_state]
        (float32 by default; float64 for a float64 model; ``ssm_state_dtype``: core.cache.ssm_state_dtype_for).
        The state does not grow with the sequence, so ``max_seqlen`` is not needed."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        state_dtype = ssm_state_dtype_for(dtype, ssm_state_dtype)
        return ConvSSMCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype),
        )

    def forward(self, x: torch.Tensor, cache: ConvSSMCache | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_model]; cache: continue from it and leave the state after x in it (L == 1 is a
        decoding step); padding_mask bool [B, L], True at real tokens, False at left padding."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba1 expects x of shape [B, L, d_model={self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if padding_mask is not None and tuple(padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"Mamba1: padding_mask must be bool [B, L] = {[batch, seqlen]}, "
                             f"got {tuple(padding_mask.shape)}")
        if cache is not None and cache.conv_state.shape[0] != batch:
            raise ValueError(f"Mamba1: the cache holds batch {cache.conv_state.shape[0]}, x has batch {batch}")

        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, d_inner] each
        keep = None if padding_mask is None else padding_mask.to(xs.dtype).unsqueeze(-1)  # [B, L, 1]
        step = cache is not None and seqlen == 1
        xs, conv_final = masked_short_conv(xs, self.conv1d, keep, cache)
        if keep is not None:
            # The conv output at a pad is silu(bias), not 0: zero the scan input so pads add nothing to the
            # state. A pad still decays the state, which is zero before the first real token.
            xs = xs * keep

        x_dbl = self.x_proj(xs)
        A = ssm_A(self)
        if step and self._fused_scan_step(xs, z, x_dbl, cache):
            # dt_proj inside the scan kernel (kernels.mamba_decode.mamba1_scan_step): one kernel, not two.
            y = mamba1_scan_step(cache.ssm_state, xs[:, 0], z[:, 0], x_dbl[:, 0], self.dt_proj.weight,
                                 self.dt_proj.bias, A, self.D).unsqueeze(1)
            return self.out_proj(y)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.config.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = F.linear(dt, self.dt_proj.weight)  # [B, L, d_inner]; the bias goes in as the scan's delta_bias

        if step:
            y = selective_scan_step(cache.ssm_state, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=self.D,
                                    z=z[:, 0], dt_bias=self.dt_proj.bias, dt_softplus=True).unsqueeze(1)
        else:
            result = selective_scan(
                xs.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=self.D,
                z=z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
                # A copy: the cache is overwritten below, after autograd may have saved its state. A 16-bit
                # state goes in as float32, the dtype the scan computes in: the same compiled kernel as
                # a float32 cache (the Triton forward compiled for a bf16 initial state rounded y's last
                # bits differently on an H100).
                initial_state=None if cache is None else
                cache.ssm_state.clone() if cache.ssm_state.dtype.itemsize >= 4 else cache.ssm_state.float(),
                return_final_state=cache is not None)
            if cache is not None:
                y, ssm_final = result
                cache.conv_state.copy_(conv_final)
                cache.ssm_state.copy_(ssm_final)
            else:
                y = result
            y = y.transpose(1, 2)  # [B, L, d_inner]
        return self.out_proj(y)

    def _fused_scan_step(self, xs: torch.Tensor, z: torch.Tensor, x_dbl: torch.Tensor, cache: ConvSSMCache) -> bool:
        """Whether this one-token step runs dt_proj + scan as one kernel (:func:`kernels.mamba_decode.
        mamba1_scan_step`, its triton backend: CUDA by default): not with Jamba's inner norms, which sit
        between x_proj and dt_proj, and only for tensors its kernel takes."""
        if self.config.inner_norms or mamba1_scan_step_backend(xs.device) != "triton":
            return False
        return mamba1_scan_step_unsupported(xs[:, 0], z[:, 0], x_dbl[:, 0], self.dt_proj.weight, cache.ssm_state,
                                            self.d_state) is None

    # ----------------------------------------------------------------------------------------------
    # The fused decoding step (kernels.mamba_decode), which core.cuda_graph.decode_step runs for the
    # whole block (residual add + norm + this mixer's step) where it can.

    def fused_step_unsupported(self) -> str | None:
        """Why the fused block step (:func:`kernels.mamba_decode.mamba1_decode_block`, triton backend)
        cannot run this layer; None when it can."""
        if self.config.inner_norms:
            return "Jamba's inner norms (dt / B / C RMSNorms) are not in the fused step"
        if self.in_proj.bias is not None or self.out_proj.bias is not None:
            return "in_proj / out_proj have biases, which the fused step does not add"
        weights = (self.in_proj.weight, self.conv1d.weight, self.x_proj.weight, self.dt_proj.weight,
                   self.out_proj.weight)
        if len({w.dtype for w in weights}) != 1 or len({w.device for w in weights}) != 1:
            return "the weights differ in dtype or device"
        return mamba1_decode_unsupported(self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv,
                                         self.in_proj.weight.dtype)

    def fused_step_weights(self) -> dict[str, torch.Tensor | None]:
        """This mixer's parameters as keyword arguments of :func:`kernels.mamba_decode.mamba1_decode_block`
        (views, no copies; A = -exp(A_log) memoized as the op-by-op step has it)."""
        return dict(in_proj_weight=self.in_proj.weight, conv_weight=self.conv1d.weight[:, 0],
                    conv_bias=self.conv1d.bias, x_proj_weight=self.x_proj.weight,
                    dt_proj_weight=self.dt_proj.weight, dt_bias=self.dt_proj.bias, A=ssm_A(self), D=self.D,
                    out_proj_weight=self.out_proj.weight)

    # ----------------------------------------------------------------------------------------------
    # The large-batch decoding step (core.cuda_graph.decode_step): in_proj, x_proj and out_proj as split-K
    # partial products (kernels.mamba_decode.linear_partials) that the conv step, the scan step and the
    # next block's norm sum.

    def partials_step_unsupported(self) -> str | None:
        """Why :meth:`step_partials` cannot run this layer; None when it can."""
        if self.config.inner_norms:
            return "Jamba's inner norms sit between x_proj and dt_proj, on x_proj's finished output"
        if self.in_proj.bias is not None or self.out_proj.bias is not None:
            return "in_proj / out_proj have biases, which partial products leave out"
        if self.d_conv > 8:
            return f"d_conv {self.d_conv} > 8 (the conv window is unrolled)"
        weights = (self.in_proj.weight, self.conv1d.weight, self.x_proj.weight, self.dt_proj.weight,
                   self.out_proj.weight)
        if len({w.dtype for w in weights}) != 1 or weights[0].dtype not in (torch.float16, torch.bfloat16,
                                                                             torch.float32):
            return "the weights must share one float16 / bfloat16 / float32 dtype"
        if self.d_state > 256:
            return f"d_state {self.d_state} > 256 (the scan step's state tile lives in registers)"
        return None

    def step_partials(self, x: torch.Tensor, cache: ConvSSMCache) -> torch.Tensor:
        """One decoding step, x [B, d_model] (the normalized stream, weights' dtype) -> out_proj's output as
        float32 partial products [S, B, d_model] (their sum, rounded to the weights' dtype, is ``forward``'s
        output up to the order of additions). The cache's states are updated in place."""
        batch, dtype = x.shape[0], self.in_proj.weight.dtype
        xz = linear_partials(x, self.in_proj.weight, linear_partials_splits(batch, 2 * self.d_inner, self.d_model))
        xs, z = conv_step_partials(xz, cache.conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, dtype)
        x_dbl = linear_partials(xs, self.x_proj.weight,
                                linear_partials_splits(batch, self.x_proj.out_features, self.d_inner))
        y = mamba1_scan_step(cache.ssm_state, xs, z, x_dbl, self.dt_proj.weight, self.dt_proj.bias, ssm_A(self),
                             self.D)
        return linear_partials(y, self.out_proj.weight, linear_partials_splits(batch, self.d_model, self.d_inner))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, inner_norms={self.config.inner_norms}")
