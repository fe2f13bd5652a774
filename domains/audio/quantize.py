"""Waveform <-> token quantization: 8-bit mu-law (SaShiMi, WaveNet) or linear, after ONE global scale.

SaShiMi normalizes every training chunk by its own min / max before quantizing, so the same sample value
maps to different tokens in different chunks and a loud chunk and a quiet one look alike. Here a single
scale (the training split's peak, computed at ``prepare`` time) divides every waveform of every split,
and decoding multiplies it back: tokens mean the same amplitude everywhere.

    x [-1, 1] float -> tokens int64 in [0, 2^bits)  (:func:`quantize`)
    tokens          -> x float32 in [-1, 1]          (:func:`dequantize`, the bin centers)

Mu-law: ``y = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` with ``mu = 2^bits - 1``, then y is quantized
linearly. Silence (x = 0) is token ``2^(bits-1)`` for both schemes (:func:`silence_token`).
"""

from __future__ import annotations

import math

import torch

SCHEMES = ("mu-law", "linear")


def _check(scheme: str, bits: int) -> int:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {list(SCHEMES)}")
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"quantization bits must be an int in [2, 16], got {bits!r}")
    return 2 ** bits


def normalize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale clipped to [-1, 1]: the one global normalization (scale from the training split)."""
    if not scale > 0:
        raise ValueError(f"the global audio scale must be > 0, got {scale}")
    return (x / scale).clamp(-1.0, 1.0)


def quantize(x: torch.Tensor, scheme: str = "mu-law", bits: int = 8) -> torch.Tensor:
    """x float [...] in [-1, 1] -> int64 tokens [...] in [0, 2^bits)."""
    levels = _check(scheme, bits)
    x = x.double().clamp(-1.0, 1.0)
    if scheme == "mu-law":
        mu = levels - 1
        x = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    # `levels` equal bins over [-1, 1]; 0 starts bin levels / 2, and 1 joins the last bin.
    return torch.floor((x + 1) / 2 * levels).long().clamp(0, levels - 1)


def dequantize(tokens: torch.Tensor, scheme: str = "mu-law", bits: int = 8) -> torch.Tensor:
    """int tokens [...] -> float32 waveform [...] in [-1, 1] (the center of each token's bin)."""
    levels = _check(scheme, bits)
    if tokens.is_floating_point():
        raise TypeError(f"dequantize expects integer tokens, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= levels):
        raise ValueError(f"tokens must be in [0, {levels}) for {bits}-bit audio, got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")
    y = (tokens.double() + 0.5) / levels * 2 - 1
    if scheme == "mu-law":
        mu = levels - 1
        y = torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu
    return y.float()


def silence_token(bits: int = 8) -> int:
    """The token of x = 0 (both schemes): 2^(bits-1)."""
    return 2 ** (bits - 1)
