"""RMSNorm and gated RMSNorm: against the formulas, group sizes, both gate orders, transformers' Mamba-2
gated norm, gradients and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.layers.norm import GatedRMSNorm, RMSNorm
from kernels.norm import rms_norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shape=(2, 5, 12), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    return x, z, weight


def direct(x, weight, eps, z=None, group_size=None, norm_before_gate=False):
    """The formulas, feature group by feature group, in float64."""
    x, weight = x.double(), weight.double()
    z = None if z is None else z.double()
    dim = x.shape[-1]
    group_size = group_size or dim
    h = x * F.silu(z) if (z is not None and not norm_before_gate) else x
    out = torch.empty_like(h)
    for start in range(0, dim, group_size):
        part = h[..., start : start + group_size]
        out[..., start : start + group_size] = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps)
    out = out * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out


@pytest.mark.parametrize("shape", [(7,), (3, 12), (2, 5, 12)])
def test_plain_matches_formula(shape):
    x, _, weight = make(shape)
    assert rel(rms_norm(x, weight, 1e-5), direct(x, weight, 1e-5)) < 1e-14
    module = RMSNorm(shape[-1], eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
    assert rel(module(x), direct(x, weight, 1e-5)) < 1e-14


def test_eps_matters_for_small_inputs():
    x, _, weight = make((4, 8))
    x = x * 1e-3
    assert rel(rms_norm(x, weight, 1e-2), direct(x, weight, 1e-2)) < 1e-14
    assert rel(rms_norm(x, weight, 1e-2), rms_norm(x, weight, 1e-8)) > 0.1


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 12, 6, 3, 1])
def test_gated_matches_formula(group_size, norm_before_gate):
    x, z, weight = make(seed=group_size or 0)
    y = rms_norm(x, weight, 1e-5, z=z, group_size=group_size, norm_before_gate=norm_before_gate)
    assert rel(y, direct(x, weight, 1e-5, z, group_size, norm_before_gate)) < 1e-14
    module = GatedRMSNorm(12, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                          dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
    assert rel(module(x, z), y) < 1e-15


def test_gate_order_and_groups_change_the_result():
    """Guards the tests above against a formula that ignores the flag or the group size."""
    x, z, weight = make(seed=1)
    after = rms_norm(x, weight, z=z, norm_before_gate=False)
    before = rms_norm(x, weight, z=z, norm_before_gate=True)
    grouped = rms_norm(x, weight, z=z, group_size=4)
    assert rel(after, before) > 1e-2 and rel(after, grouped) > 1e-2
    # Without a gate the gated module is the plain norm.
    ungated = GatedRMSNorm(12, group_size=12, dtype=torch.float64)(x)
    assert rel(ungated, rms_norm(x, torch.ones(12, dtype=torch.float64))) < 1e-15


@pytest.mark.parametrize("group_size", [16, 8, 4])
def test_matches_transformers_mamba2_gated_norm(group_size):
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    x, z, weight = make((2, 6, 16), dtype=torch.float32, seed=group_size)
    theirs = modeling.MambaRMSNormGated(16, group_size=group_size, eps=1e-5)
    ours = GatedRMSNorm(16, eps=1e-5, group_size=group_size, norm_before_gate=False)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        ours.weight.copy_(weight)
    assert rel(ours(x, z), theirs(x, z)) < 1e-6
    assert rel(ours(x), theirs(x)) < 1e-6


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gradcheck(norm_before_gate):
    x, z, weight = make((2, 3, 6), seed=2)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, z))

    def fn(x, weight, z):
        return rms_norm(x, weight, 1e-5, z=z, group_size=3, norm_before_gate=norm_before_gate)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_low_precision_keeps_dtype():
    x, z, weight = make(seed=3)
    y = rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5, z=z.bfloat16(), group_size=6)
    assert y.dtype == torch.bfloat16
    assert rel(y, direct(x.bfloat16(), weight.bfloat16(), 1e-5, z.bfloat16(), 6)) < 1e-2
    assert rms_norm(x.float(), weight.float()).dtype == torch.float32


def test_clear_errors():
    x, z, weight = make()
    with pytest.raises(ValueError, match="group_size"):
        rms_norm(x, weight, z=z, group_size=5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:4])
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(12, group_size=5)
