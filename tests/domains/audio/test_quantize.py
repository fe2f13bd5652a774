"""Quantization: inverse pairs, the silence token, one global scale, errors."""

from __future__ import annotations

import pytest
import torch

from domains.audio.quantize import dequantize, normalize, quantize, silence_token


@pytest.mark.parametrize("scheme", ["mu-law", "linear"])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_and_monotone(scheme: str, bits: int):
    x = torch.linspace(-1, 1, 4001)
    q = quantize(x, scheme, bits)
    assert q.min() == 0 and q.max() == 2 ** bits - 1
    assert bool((q[1:] >= q[:-1]).all())
    y = dequantize(q, scheme, bits)
    assert torch.equal(quantize(y, scheme, bits), q)  # the bin centers quantize back to their token
    levels = torch.arange(2 ** bits)
    assert torch.equal(quantize(dequantize(levels, scheme, bits), scheme, bits), levels)
    assert int(quantize(torch.zeros(1), scheme, bits)) == silence_token(bits)


def test_mu_law_resolves_quiet_sounds_finer_than_linear():
    quiet = torch.linspace(-0.01, 0.01, 1001)
    assert quantize(quiet, "mu-law").unique().numel() > 5 * quantize(quiet, "linear").unique().numel()
    x = torch.tensor([0.001, 0.01, 0.1, 0.5])
    err = (dequantize(quantize(x, "mu-law"), "mu-law") - x).abs()
    assert bool((err <= 0.04 * x + 1e-4).all())  # relative precision, as mu-law promises


def test_one_global_scale_keeps_amplitudes_comparable():
    loud, quiet = torch.tensor([0.8, -0.4]), torch.tensor([0.2, -0.1])
    scale = 0.8  # the training split's peak
    # A per-chunk normalization would map both chunks to the same tokens; the global one does not.
    assert not torch.equal(quantize(normalize(loud, scale)), quantize(normalize(quiet, scale)))
    assert torch.equal(quantize(normalize(torch.tensor([2.0]), scale)), torch.tensor([255]))  # clipped to 1


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="mu-law"):
        quantize(torch.zeros(2), "alaw")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        dequantize(torch.tensor([256]))
    with pytest.raises(ValueError, match="scale"):
        normalize(torch.zeros(2), 0.0)
