"""Blocks, backbone and CausalLM: names, shapes, loss, aux losses, init, cache, validation errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core.backbone as backbone_module
from core.backbone import Block, CausalLM, CausalLMOutput, build_mixer, config_problems, validate_config
from core.cache import ConvSSMCache, HyenaCache, InferenceCache, KVCache
from core.config import (
    AttentionConfig,
    HyenaConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)

MIXER_MODULES = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "S": "mamba1", "H": "hyena"}


def have(chars: str) -> bool:
    return all(importlib.util.find_spec(f"core.layers.{MIXER_MODULES[c]}") is not None for c in set(chars))


def needs(chars: str):
    missing = sorted({MIXER_MODULES[c] for c in chars if not have(c)})
    return pytest.mark.skipif(bool(missing), reason=f"mixer module(s) {missing} not written yet")


def small_config(pattern: str, **overrides) -> ModelConfig:
    """A small model over every block type; vocab 250 pads to 256 rows."""
    defaults = dict(
        d_model=32,
        pattern=pattern,
        vocab_size=250,
        mamba1=Mamba1Config(d_state=8),
        mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=2, chunk_size=8),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope=True),
        mlp=MLPConfig(),
        moe=MoEConfig(n_experts=4, top_k=2, hidden_size=48),
        hyena=HyenaConfig(filter_order=16, max_seqlen=64),
    )
    defaults.update(overrides)
    return ModelConfig(**defaults)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    # (pattern, overrides, expected fragments of the message)
    ("*", dict(d_model=66), ["attention.n_heads", "d_model = 66 is not divisible by n_heads = 4", "head_dim"]),
    ("M", dict(mamba2=Mamba2Config(headdim=48)), ["mamba2.headdim", "48 does not divide d_inner", "= 64"]),
    ("M", dict(mamba2=Mamba2Config(headdim=16, ngroups=3)),
     ["mamba2.ngroups", "3 does not divide the number of heads", "= 4", "divisors of 4"]),
    ("*", dict(attention=AttentionConfig(n_heads=4, n_kv_heads=3)),
     ["attention.n_kv_heads", "3 does not divide n_heads = 4", "[1, 2, 4]"]),
    ("*", dict(attention=AttentionConfig(n_heads=8, head_dim=3, rope=True)), ["even head_dim", "rope=False"]),
    ("-", dict(vocab_size=0), ["vocab_size", "positive", "tokenizer"]),
    ("", {}, ["pattern", "empty"]),
    ("M*q", {}, ["'q'", "position 2"]),
    ("E", dict(moe=MoEConfig(n_experts=4, top_k=5)), ["moe.top_k", "[1, n_experts = 4]"]),
    ("-", dict(mlp=MLPConfig(activation="relu")), ["mlp.activation", "'swiglu' or 'gelu'"]),
    ("H", dict(hyena=HyenaConfig(filter_emb_dim=4)), ["hyena.filter_emb_dim", "odd"]),
    ("S", dict(mamba1=Mamba1Config(dt_init="zeros")), ["mamba1.dt_init"]),
    ("-", dict(d_model=0), ["d_model", "positive"]),
]


@pytest.mark.parametrize("pattern, overrides, fragments", BAD_CONFIGS)
def test_bad_shapes_fail_before_any_allocation(monkeypatch, pattern, overrides, fragments):
    config = small_config(pattern, **overrides)

    def no_allocation(*args, **kwargs):
        raise AssertionError("a module was built before the config was validated")

    monkeypatch.setattr(backbone_module, "build_mixer", no_allocation)
    monkeypatch.setattr(backbone_module.nn, "Embedding", no_allocation)
    with pytest.raises(ValueError) as info:
        CausalLM(config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_all_problems_reported_at_once_and_unused_subconfigs_ignored():
    config = small_config("*M", d_model=66, mamba2=Mamba2Config(headdim=64, ngroups=5),
                          moe=MoEConfig(n_experts=2, top_k=3))
    problems = config_problems(config)
    assert any(p.startswith("attention.n_heads") for p in problems)
    assert any(p.startswith("mamba2.headdim") for p in problems)
    assert not any(p.startswith("moe") for p in problems)  # no E block: the MoE config is not used
    with pytest.raises(ValueError, match="invalid model config") as info:
        validate_config(config)
    assert str(info.value).count("\n- ") == len(problems)
    # A valid pattern whose unused sub-configs are broken builds.
    assert config_problems(small_config("-", mamba2=Mamba2Config(headdim=7))) == []


# --------------------------------------------------------------------------------------------------
# Structure, names, mixers
# --------------------------------------------------------------------------------------------------

@needs("M*-E")
def test_parameter_names_are_mamba_ssm_and_llama_names():
    model = CausalLM(small_config("M*-E", tie_embeddings=False))
    names = set(dict(model.named_parameters()))
    expected = {
        "backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight",
        "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D",
        "backbone.layers.0.mixer.dt_bias", "backbone.layers.0.mixer.norm.weight",
        "backbone.layers.0.mixer.out_proj.weight",
        "backbone.layers.1.mixer.q_proj.weight", "backbone.layers.1.mixer.k_proj.weight",
        "backbone.layers.1.mixer.v_proj.weight", "backbone.layers.1.mixer.o_proj.weight",
        "backbone.layers.2.mixer.gate_proj.weight", "backbone.layers.2.mixer.up_proj.weight",
        "backbone.layers.2.mixer.down_proj.weight",
        "backbone.layers.3.mixer.router.weight", "backbone.layers.3.mixer.experts.down_proj",
    }
    assert expected <= names, sorted(expected - names)
    assert model.backbone.embedding.weight.shape == (256, 32)
    assert [block.char for block in model.backbone.layers] == list("M*-E")


@pytest.mark.parametrize("char", list("M*-ESH"))
def test_build_mixer_picks_the_class_of_the_char(char):
    if not have(char):
        pytest.skip(f"core/layers/{MIXER_MODULES[char]}.py not written yet")
    config = small_config(char)
    mixer = build_mixer(char, config.d_model, config, layer_idx=3)
    expected = {"M": "Mamba2", "*": "Attention", "-": "MLP", "E": "MoE", "S": "Mamba1", "H": "Hyena"}[char]
    assert type(mixer).__name__ == expected
    with pytest.raises(ValueError, match="unknown block character"):
        build_mixer("x", config.d_model, config)


@needs("-")
def test_block_is_residual_of_mixer_of_norm():
    torch.manual_seed(0)
    config = small_config("-", residual_in_fp32=False)
    block = Block("-", config, layer_idx=0).double()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    y, aux = block(x)
    assert aux == {}
    expected = x + block.mixer(block.norm(x))
    assert rel_err(y, expected) < 1e-14


@needs("*-")
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_residual_stream_dtype(residual_in_fp32):
    config = small_config("*-", residual_in_fp32=residual_in_fp32)
    model = CausalLM(config).to(torch.bfloat16)
    seen = []
    for block in model.backbone.layers:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out[0].dtype)))
        block.mixer.register_forward_hook(lambda module, args, out: seen.append(("mixer", args[0].dtype)))
    out = model(torch.randint(0, 250, (2, 6)))
    stream = torch.float32 if residual_in_fp32 else torch.bfloat16
    assert ("mixer", torch.bfloat16) in seen  # mixers run in the model dtype either way
    assert all(entry[1] == stream for entry in seen if entry[0] != "mixer")
    assert out.logits.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Logits, loss, aux losses
# --------------------------------------------------------------------------------------------------

@needs("*-")
def test_logits_drop_padded_vocab_rows_and_match_the_tied_head():
    torch.manual_seed(0)
    model = CausalLM(small_config("*-"))
    ids = torch.randint(0, 250, (3, 7))
    out = model(ids)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (3, 7, 250) and out.logits.dtype == torch.float32
    assert out.loss is None and out.ce_loss is None and out.aux_losses == {}
    hidden, _ = model.backbone(ids)
    full = hidden @ model.backbone.embedding.weight.t()  # [3, 7, 256]
    assert full.shape[-1] == 256
    assert rel_err(out.logits, full[..., :250]) < 1e-6
    last = model(ids, num_last_tokens=2).logits
    assert rel_err(last, out.logits[:, -2:]) < 1e-6
    with torch.no_grad():  # the fused-norm forward: the final add + norm over the last positions only
        tail, _ = model.backbone(ids, num_last_tokens=2)
        assert tail.shape == (3, 2, 32) and rel_err(tail, model.backbone(ids)[0][:, -2:]) < 1e-6
        assert rel_err(model(ids, num_last_tokens=2).logits, out.logits[:, -2:]) < 1e-6


@needs("*-")
def test_loss_ignores_minus_100_and_averages_over_kept_tokens():
    torch.manual_seed(0)
    model = CausalLM(small_config("*-"))
    ids = torch.randint(0, 250, (2, 9))
    labels = torch.randint(0, 250, (2, 9))
    labels[0, :4] = -100
    labels[1, -1] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = F.cross_entropy(out.logits.detach()[keep].double(), labels[keep])
    assert abs(out.ce_loss.item() - expected.item()) < 1e-5
    assert out.loss is out.ce_loss or torch.equal(out.loss, out.ce_loss)
    # Changing the label at an ignored position changes nothing.
    labels2 = labels.clone()
    labels2[0, :4] = -100
    assert torch.equal(model(ids, labels=labels2).ce_loss, out.ce_loss)
    # Every label ignored: 0, not NaN, and backward still runs.
    none = model(ids, labels=torch.full_like(labels, -100))
    assert none.ce_loss.item() == 0.0
    none.loss.backward()


@needs("*-")
def test_forward_backward_reach_every_parameter():
    torch.manual_seed(0)
    model = CausalLM(small_config("*-*-", tie_embeddings=False))
    ids = torch.randint(0, 250, (2, 6))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "backbone.embedding.weight":  # rows of tokens not in the batch get none
            assert p.grad.abs().sum() > 0, name


@needs("E-")
def test_moe_aux_losses_summed_over_layers_and_added_to_loss():
    torch.manual_seed(0)
    model = CausalLM(small_config("E-E", moe=MoEConfig(n_experts=4, top_k=2, hidden_size=48,
                                                       load_balancing_coef=0.1, z_loss_coef=0.01)))
    per_layer = []
    for block in model.backbone.layers:
        if block.char == "E":
            block.mixer.register_forward_hook(lambda module, args, out: per_layer.append(out[1]))
    ids = torch.randint(0, 250, (2, 8))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balancing", "router_z"}
    assert len(per_layer) == 2
    for key in out.aux_losses:
        assert torch.allclose(out.aux_losses[key], per_layer[0][key] + per_layer[1][key])
        assert out.aux_losses[key].item() > 0
    assert torch.allclose(out.loss, out.ce_loss + out.aux_losses["load_balancing"] + out.aux_losses["router_z"])
    assert out.loss.item() > out.ce_loss.item()
    out.loss.backward()
    assert model.backbone.layers[0].mixer.router.weight.grad.abs().sum() > 0


@needs("*-")
def test_input_errors():
    model = CausalLM(small_config("*-"))
    ids = torch.randint(0, 250, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be int64 \[B, L\]"):
        model(ids.float())
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        model(ids, padding_mask=torch.ones(2, 5))
    cache = model.allocate_cache(2, 6)
    with pytest.raises(ValueError, match="allocated for batch 2"):
        model(ids[:1], cache=cache)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="larger max_seqlen"):
        model(ids[:, :2], cache=cache)


# --------------------------------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------------------------------

def _uniform_bound(weight: torch.Tensor) -> float:
    """Half-width of the uniform a max-abs-and-std pair points at (std of U(-b, b) is b / sqrt(3))."""
    return weight.float().std().item() * math.sqrt(3)


@needs("*-E")
def test_init_tied_embedding_std_and_rescaled_output_projections():
    torch.manual_seed(0)
    config = small_config("*-E-", d_model=64, vocab_size=4000, initializer_range=0.02,
                          attention=AttentionConfig(n_heads=4, qkv_bias=True, out_bias=True),
                          mlp=MLPConfig(hidden_size=512, bias=True),
                          moe=MoEConfig(n_experts=4, top_k=2, hidden_size=256))
    model = CausalLM(config)
    embedding = model.backbone.embedding.weight
    assert model.lm_head.weight is embedding
    assert abs(embedding.std().item() - 0.02) < 0.02 * 0.03 and abs(embedding.mean().item()) < 1e-3
    depth = len(config.pattern)
    attention, mlp, moe = (model.backbone.layers[i].mixer for i in range(3))
    for weight, fan_in in ((attention.o_proj.weight, 64), (mlp.down_proj.weight, 512)):
        bound = 1 / math.sqrt(fan_in) / math.sqrt(depth)
        assert weight.abs().max().item() <= bound
        assert abs(_uniform_bound(weight) - bound) < 0.05 * bound
    for expert in moe.experts.down_proj:  # each expert: fan_in = its hidden size
        bound = 1 / math.sqrt(256) / math.sqrt(depth)
        assert expert.abs().max().item() <= bound
        assert abs(_uniform_bound(expert) - bound) < 0.08 * bound
    # Other matrices keep their mixer's (nn.Linear) init, unscaled; Linear biases are zero.
    q_bound = 1 / math.sqrt(64)
    assert abs(_uniform_bound(attention.q_proj.weight) - q_bound) < 0.05 * q_bound
    for bias in (attention.q_proj.bias, attention.o_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias):
        assert torch.count_nonzero(bias) == 0
    # Without the rescale, the output projections keep the plain bound.
    torch.manual_seed(0)
    plain = CausalLM(small_config("*-E-", d_model=64, rescale_prenorm_residual=False,
                                  mlp=MLPConfig(hidden_size=512)))
    weight = plain.backbone.layers[1].mixer.down_proj.weight
    assert abs(_uniform_bound(weight) - 1 / math.sqrt(512)) < 0.05 / math.sqrt(512)


@needs("*-")
def test_untied_head_is_a_separate_parameter():
    model = CausalLM(small_config("*-", tie_embeddings=False))
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert model.lm_head.weight.data_ptr() != model.backbone.embedding.weight.data_ptr()
    n_tied = sum(p.numel() for p in CausalLM(small_config("*-")).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_tied + 256 * 32


@needs("S")
def test_init_keeps_no_reinit_biases():
    torch.manual_seed(0)
    model = CausalLM(small_config("SS"))
    dt_bias = model.backbone.layers[0].mixer.dt_proj.bias
    assert getattr(dt_bias, "_no_reinit", False)
    assert torch.count_nonzero(dt_bias) == dt_bias.numel()  # inverse-softplus init, not zeroed
    dt = F.softplus(dt_bias)
    assert dt.min() >= 1e-4 * 0.99 and dt.max() <= 0.1 * 1.01


def test_missing_output_projection_is_reported(monkeypatch):
    class NoOutput(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, cache=None, padding_mask=None):
            return self.proj(x)

    monkeypatch.setattr(backbone_module, "build_mixer", lambda *args, **kwargs: NoOutput())
    with pytest.raises(RuntimeError, match="output projections"):
        CausalLM(ModelConfig(d_model=8, pattern="-", vocab_size=16))
    CausalLM(ModelConfig(d_model=8, pattern="-", vocab_size=16, rescale_prenorm_residual=False))


# --------------------------------------------------------------------------------------------------
# Inference cache and padding
# --------------------------------------------------------------------------------------------------

CACHE_TYPES = {"M": ConvSSMCache, "S": ConvSSMCache, "*": KVCache, "H": HyenaCache, "-": type(None),
               "E": type(None)}


@pytest.mark.parametrize("pattern", ["M*-E", "S-", "H-", "SM*H-E"])
def test_cache_prefill_then_steps_equal_full_forward(pattern):
    if not have(pattern):
        pytest.skip("mixer modules not written yet")
    torch.manual_seed(0)
    model = CausalLM(small_config(pattern)).double()
    ids = torch.randint(0, 250, (2, 11))
    full = model(ids).logits
    cache = model.allocate_cache(2, 16)
    assert isinstance(cache, InferenceCache) and len(cache.layers) == len(pattern)
    assert cache.batch_size == 2 and cache.max_seqlen == 16 and cache.seqlen_offset == 0
    for char, layer in zip(pattern, cache.layers):
        assert isinstance(layer, CACHE_TYPES[char]), (char, type(layer))
    pieces = [model(ids[:, :7], cache=cache).logits]  # odd-length prefill
    assert cache.seqlen_offset == 7
    for t in range(7, 11):
        pieces.append(model(ids[:, t:t + 1], cache=cache).logits)  # L = 1 steps
    assert cache.seqlen_offset == 11
    # The model runs in float64; the logits come back float32, so agreement is to float32 rounding.
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-6
    # The float64 hidden states agree to float64 rounding.
    hidden_full, _ = model.backbone(ids)
    assert hidden_full.dtype == torch.float64
    cache = model.allocate_cache(2, 16)
    hidden = [model.backbone(ids[:, :4], cache=cache)[0]]
    hidden += [model.backbone(ids[:, t:t + 1], cache=cache)[0] for t in range(4, 11)]
    assert rel_err(torch.cat(hidden, dim=1), hidden_full) < 1e-12


@pytest.mark.parametrize("pattern", ["M*-E", "S-", "H-"])
def test_left_padding_matches_unpadded_rows(pattern):
    if not have(pattern):
        pytest.skip("mixer modules not written yet")
    torch.manual_seed(0)
    model = CausalLM(small_config(pattern)).double()
    short = torch.randint(0, 250, (1, 5))
    long = torch.randint(0, 250, (1, 8))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    out = model(ids, padding_mask=mask).logits
    assert rel_err(out[0, 3:], model(short).logits[0]) < 1e-6  # float32 logits of a float64 model
    assert rel_err(out[1], model(long).logits[0]) < 1e-6
    # The pad id does not matter, even one outside the vocabulary.
    ids[0, :3] = -1
    assert torch.equal(model(ids, padding_mask=mask).logits[:, 3:], out[:, 3:])


@pytest.mark.parametrize("pattern", ["M*-E", "S-", "H-", "SM*H-E"])
@pytest.mark.parametrize("residual_in_fp32, dtype", [(True, torch.bfloat16), (False, torch.bfloat16),
                                                     (True, torch.float64)])
def test_inference_forward_fuses_the_residual_add_into_the_norm(monkeypatch, pattern, residual_in_fp32, dtype):
    # Without autograd the backbone adds each block's output inside the next block's norm: the same
    # arithmetic as Block.forward (the sum stored in the stream's dtype, then normalized), so the logits,
    # aux losses and cached states are bit-identical to the forward with autograd.
    if not have(pattern):
        pytest.skip("mixer modules not written yet")
    torch.manual_seed(0)
    model = CausalLM(small_config(pattern, residual_in_fp32=residual_in_fp32)).to(dtype)
    ids = torch.randint(0, 250, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    want = model(ids, padding_mask=mask)
    cache_want = model.allocate_cache(2, 12)
    want_cached = model(ids, cache=cache_want, padding_mask=mask, num_last_tokens=1)
    fused_calls = []
    real = backbone_module.rms_norm
    monkeypatch.setattr(backbone_module, "rms_norm", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids, padding_mask=mask)
        cache_got = model.allocate_cache(2, 12)
        got_cached = model(ids, cache=cache_got, padding_mask=mask, num_last_tokens=1)
    assert len(fused_calls) == 2 * len(pattern)  # the fused path ran, one fused norm a block
    assert torch.equal(got.logits, want.logits) and torch.equal(got_cached.logits, want_cached.logits)
    assert got.aux_losses.keys() == want.aux_losses.keys()
    assert all(torch.equal(got.aux_losses[k], want.aux_losses[k]) for k in want.aux_losses)
    assert cache_got.seqlen_offset == cache_want.seqlen_offset == 9
    for a, b in zip(cache_got.layers, cache_want.layers):
        for name in ("conv_state", "ssm_state", "key", "value", "valid", "short_state"):
            if hasattr(b, name) and isinstance(getattr(b, name), torch.Tensor):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_inference_forward_keeps_hooks_and_compiled_blocks():
    # A hook on a block or its norm (a probe) still fires: such blocks take Block.forward.
    model = CausalLM(small_config("S-")).eval()
    ids = torch.randint(0, 250, (1, 5))
    seen = []
    handle = model.backbone.layers[1].norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.no_grad():
        hooked = model(ids).logits
    handle.remove()
    assert seen == [(1, 5, 32)]
    assert not model.backbone._fused_norms()  # autograd on: Block.forward
    with torch.no_grad():
        assert model.backbone._fused_norms() and torch.equal(model(ids).logits, hooked)
        model.backbone.layers[0].forward = model.backbone.layers[0].forward  # as compile_blocks replaces it
        assert not model.backbone._fused_norms()
