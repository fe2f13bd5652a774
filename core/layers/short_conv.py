"""What both Mamba mixers share: the short causal convolution they run before their scan (cache and
padding included) and their continuous-time decay A = -exp(A_log)."""

from __future__ import annotations

import torch
from torch import nn

from core.cache import ConvSSMCache, decode_memo
from kernels.causal_conv1d import causal_conv1d, causal_conv1d_step


def masked_short_conv(x: torch.Tensor, conv: nn.Conv1d, keep: torch.Tensor | None,
                      cache: ConvSSMCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(depthwise causal conv(x)) over channel-last x [B, L, C]; returns y [B, L, C] and, for a
    prefill with a cache, the final conv state [B, C, W-1] (the caller writes it back once the scan has
    also succeeded); None otherwise.

    keep [B, L, 1] (1 at real tokens, 0 at left padding) zeroes the pads before the conv, so they stay
    out of the first real positions' windows. With a cache, L == 1 is a decoding step that updates
    ``cache.conv_state`` in place; L > 1 starts from the cached state.
    """
    if keep is not None:
        x = x * keep
    weight = conv.weight.squeeze(1)  # [C, W]
    if cache is not None and x.shape[1] == 1:
        return causal_conv1d_step(x[:, 0], cache.conv_state, weight, conv.bias, "silu").unsqueeze(1), None
    if cache is not None:
        y, final = causal_conv1d(x.transpose(1, 2), weight, conv.bias, "silu",
                                 initial_state=cache.conv_state, return_final_state=True)
        return y.transpose(1, 2), final
    return causal_conv1d(x.transpose(1, 2), weight, conv.bias, "silu").transpose(1, 2), None


def _negative_exp(A_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(A_log if A_log.dtype == torch.float64 else A_log.float())


def ssm_A(mixer: nn.Module) -> torch.Tensor:
    """A = -exp(mixer.A_log) in float32 (float64 stays). Without autograd (generation) it is computed once
    and reused until A_log changes, so a decoding step (or its CUDA graph) does not recompute it."""
    if torch.is_grad_enabled():
        return _negative_exp(mixer.A_log)
    return decode_memo(mixer, "A", [mixer.A_log], lambda: _negative_exp(mixer.A_log))

