"""Mamba-1 mixer: caching (prefill, steps), left padding, init, parameter count, transformers parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.cache import ConvSSMCache
from core.config import Mamba1Config
from core.layers.mamba1 import Mamba1
from kernels.dispatch import forced_backend

D_MODEL = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_mixer(inner_norms: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> Mamba1:
    """A tiny mixer whose state actually matters: slower decays than at init (dt ~ 0.1-0.5) and
    random-ish conv and norm weights, so that a broken cache or mask shows."""
    torch.manual_seed(seed)
    config = Mamba1Config(d_state=4, d_conv=4, expand=2, dt_min=0.1, dt_max=0.5, inner_norms=inner_norms,
                          **overrides)
    mixer = Mamba1(D_MODEL, config, layer_idx=0).to(dtype)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return mixer


def tokens(batch: int, seqlen: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seqlen, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("inner_norms", [False, True])
def test_forward_equals_prefill_then_steps(inner_norms):
    mixer = make_mixer(inner_norms)
    x = tokens(2, 11)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.allocate_cache(2, 11)
        assert cache.ssm_state.dtype == torch.float64 and cache.conv_state.dtype == torch.float64
        outs = [mixer(x[:, :6], cache=cache)]
        for t in range(6, 11):
            outs.append(mixer(x[:, t : t + 1], cache=cache))
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-12


def test_prefill_in_two_parts_equals_one():
    mixer = make_mixer(inner_norms=True)
    x = tokens(2, 23)
    with torch.no_grad():
        one = mixer.allocate_cache(2, 23)
        y_one = mixer(x, cache=one)
        two = mixer.allocate_cache(2, 23)
        y_two = torch.cat([mixer(x[:, :9], cache=two), mixer(x[:, 9:], cache=two)], dim=1)
    assert rel_err(y_two, y_one) < 1e-12
    assert rel_err(two.ssm_state, one.ssm_state) < 1e-12
    assert rel_err(two.conv_state, one.conv_state) < 1e-12
    assert one.ssm_state.abs().sum() > 0


def test_cache_shapes_and_dtypes():
    mixer = Mamba1(D_MODEL, Mamba1Config(d_state=8, d_conv=3, expand=3), dtype=torch.bfloat16)
    cache = mixer.allocate_cache(5, 100)
    assert isinstance(cache, ConvSSMCache)
    assert cache.conv_state.shape == (5, 48, 2) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (5, 48, 8) and cache.ssm_state.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_left_padded_batch_equals_each_sequence_alone(bias):
    mixer = make_mixer(inner_norms=True, bias=bias)
    lengths = [9, 4, 1]
    width = max(lengths)
    x = tokens(len(lengths), width, seed=2)  # the pad positions hold garbage, as real embeddings would
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = True
    step = tokens(len(lengths), 1, seed=3)
    with torch.no_grad():
        y = mixer(x, padding_mask=mask)
        cache = mixer.allocate_cache(len(lengths), width + 1)
        mixer(x, cache=cache, padding_mask=mask)
        y_step = mixer(step, cache=cache)
        for row, n in enumerate(lengths):
            alone = x[row : row + 1, width - n :]
            assert rel_err(y[row : row + 1, width - n :], mixer(alone)) < 1e-12
            own = mixer.allocate_cache(1, n + 1)
            mixer(alone, cache=own)
            assert rel_err(y_step[row : row + 1], mixer(step[row : row + 1], cache=own)) < 1e-12
    # Without the mask the pads do leak into the short rows (the test above is not vacuous).
    with torch.no_grad():
        unmasked = mixer(x)
    assert rel_err(unmasked[1:2, width - 4 :], y[1:2, width - 4 :]) > 1e-3


def test_init_follows_mamba_ssm():
    torch.manual_seed(0)
    config = Mamba1Config(d_state=16, expand=2, dt_min=0.001, dt_max=0.1)
    mixer = Mamba1(64, config, dtype=torch.bfloat16)
    d_inner, dt_rank = 128, math.ceil(64 / 16)
    assert mixer.d_inner == d_inner and mixer.dt_rank == dt_rank
    expected_A_log = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(d_inner, 16)
    assert torch.equal(mixer.A_log.data, expected_A_log)
    assert torch.equal(mixer.D.data, torch.ones(d_inner))
    dt = F.softplus(mixer.dt_proj.bias.double())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not one value
    bound = dt_rank**-0.5 * config.dt_scale
    weight = mixer.dt_proj.weight.float()
    assert weight.abs().max() <= bound * (1 + 1e-2) and weight.abs().max() > 0.8 * bound
    for param in (mixer.A_log, mixer.D, mixer.dt_proj.bias):
        assert param.dtype == torch.float32
        assert getattr(param, "_no_weight_decay", False)
    assert getattr(mixer.dt_proj.bias, "_no_reinit", False)
    assert mixer.in_proj.weight.dtype == torch.bfloat16 and mixer.in_proj.bias is None
    assert mixer.conv1d.weight.shape == (d_inner, 1, 4)

    constant = Mamba1(64, Mamba1Config(dt_init="constant", dt_scale=2.0))
    assert torch.allclose(constant.dt_proj.weight, torch.full_like(constant.dt_proj.weight, 2.0 / math.sqrt(4)))
    floored = Mamba1(64, Mamba1Config(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4))
    assert torch.allclose(F.softplus(floored.dt_proj.bias), torch.full((128,), 1e-4), rtol=1e-4)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="dt_init"):
        Mamba1(16, Mamba1Config(dt_init="normal"))
    with pytest.raises(ValueError, match="dt_min"):
        Mamba1(16, Mamba1Config(dt_min=0.1, dt_max=0.01))
    mixer = Mamba1(16, Mamba1Config())
    with pytest.raises(ValueError, match="d_model=16"):
        mixer(torch.zeros(1, 3, 15))
    with pytest.raises(ValueError, match="padding_mask"):
        mixer(torch.zeros(1, 3, 16), padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"):
        mixer(torch.zeros(2, 3, 16), cache=mixer.allocate_cache(1, 3))


def test_parameter_count_d_model_768():
    mixer = Mamba1(768, Mamba1Config(), device="meta")
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in mixer.named_children()}
    assert counts == {"in_proj": 2_359_296, "conv1d": 7_680, "x_proj": 122_880, "dt_proj": 75_264,
                      "out_proj": 1_179_648}
    assert mixer.A_log.numel() == 24_576 and mixer.D.numel() == 1_536
    # 3,770,880; with the block's RMSNorm (768) it is mamba_ssm's 3,771,648 a layer (24 of them, the
    # embedding and the final norm make mamba-130m's 129,135,360).
    assert sum(p.numel() for p in mixer.parameters()) == 3_770_880
    assert sum(p.numel() for p in mixer.parameters()) + 768 == 3_771_648
    with_norms = Mamba1(768, Mamba1Config(inner_norms=True), device="meta")
    assert sum(p.numel() for p in with_norms.parameters()) == 3_770_880 + 48 + 16 + 16


@pytest.mark.parametrize("inner_norms", [False, True])
def test_backward_reaches_every_parameter(inner_norms):
    mixer = make_mixer(inner_norms, dtype=torch.float32)
    x = tokens(2, 37, dtype=torch.float32).requires_grad_()
    mixer(x).pow(2).mean().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_backends_agree_on_gradients():
    mixer = make_mixer(inner_norms=True)
    x = tokens(2, 29)
    grads = []
    for backend in ("reference", "chunked"):
        mixer.zero_grad()
        with forced_backend(backend, "selective_scan"):
            mixer(x).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in mixer.named_parameters()})
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-11, name


def test_bfloat16_mixer_close_to_float32():
    mixer32 = make_mixer(inner_norms=True, dtype=torch.float32)
    mixer16 = make_mixer(inner_norms=True, dtype=torch.float32)
    mixer16.load_state_dict(mixer32.state_dict())
    for name, module in mixer16.named_children():  # the model dtype; A_log, D, dt bias stay float32
        if name != "dt_proj":
            module.to(torch.bfloat16)
    mixer16.dt_proj.weight.data = mixer16.dt_proj.weight.data.bfloat16()
    x = tokens(2, 20, dtype=torch.float32)
    with torch.no_grad():
        y16 = mixer16(x.bfloat16())
        y32 = mixer32(x)
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) < 5e-2


# --- cross-check: transformers' MambaMixer / JambaMambaMixer (their slow CPU paths) ---------------------

def _transformers_mixer(inner_norms: bool):
    transformers = pytest.importorskip("transformers")
    if inner_norms:
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer

        config = transformers.JambaConfig(
            hidden_size=D_MODEL, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=3,
            mamba_proj_bias=False, rms_norm_eps=1e-6, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, vocab_size=64)
        return JambaMambaMixer(config, 0)
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = transformers.MambaConfig(hidden_size=D_MODEL, state_size=8, conv_kernel=4, expand=2,
                                      time_step_rank=3, use_bias=True, num_hidden_layers=1)
    return MambaMixer(config, 0)


@pytest.mark.parametrize("inner_norms", [False, True], ids=["MambaMixer", "JambaMambaMixer"])
def test_matches_transformers(inner_norms):
    torch.manual_seed(0)
    theirs = _transformers_mixer(inner_norms).eval()
    config = Mamba1Config(d_state=8, d_conv=4, expand=2, dt_rank=3, bias=not inner_norms, inner_norms=inner_norms)
    ours = Mamba1(D_MODEL, config, norm_eps=1e-6).eval()
    state = theirs.state_dict()
    assert sorted(state) == sorted(ours.state_dict())  # checkpoints map by name
    gen = torch.Generator().manual_seed(5)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if "layernorm" in k else v for k, v in state.items()}
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    x = tokens(2, 19, dtype=torch.float32, seed=6)
    with torch.no_grad():
        expected = theirs(x)
        actual = ours(x)
    assert rel_err(actual, expected) <= 1e-4
