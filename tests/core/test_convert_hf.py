"""Interop with HF transformers (Mamba, Mamba-2, Jamba, Llama) and mamba_ssm checkpoints.

Each HF family is built at a tiny random config on CPU in float32 (transformers' slow torch paths: no
mamba_ssm / causal_conv1d needed), its weights perturbed so that no parameter keeps a symmetric init
value (all-ones norms would hide a swapped mapping), then converted to ours and back.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from core import convert_hf as C  # noqa: E402
from core.backbone import CausalLM  # noqa: E402
from core.checkpoint import CheckpointError, load_pretrained  # noqa: E402
from core.config import ModelConfig  # noqa: E402
from core.generate import generate  # noqa: E402
from core.pattern import jamba_pattern  # noqa: E402

VOCAB = 128
SEQLEN = 13  # odd, and over two Mamba-2 chunks of 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.mul_(1 + 0.2 * noise).add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def hf_models() -> dict[str, object]:
    """Tiny HF configs; Jamba covers Mamba + MLP, Mamba + MoE and attention + MLP layers."""
    return {
        "mamba": transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
            time_step_rank=6, layer_norm_epsilon=1e-5,
        ),
        "mamba2": transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=2,
            num_hidden_layers=2, chunk_size=8, layer_norm_epsilon=1e-5,
        ),
        "jamba": transformers.JambaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
            rms_norm_eps=1e-5,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            rms_norm_eps=1e-5,
        ),
    }


EXPECTED_PATTERNS = {"mamba": "SS", "mamba2": "MM", "jamba": "S-SE*-SE", "llama": "*-*-"}


@functools.lru_cache(maxsize=None)  # tests only read the HF models
def build_hf(family: str):
    torch.manual_seed(0)
    config = hf_models()[family]
    model = getattr(transformers, C.HF_CLASSES[family][1])(config)
    perturb(model)
    if family == "mamba":
        # With tied embeddings and small mixer outputs the logits echo the input token, and the greedy
        # continuation repeats one token; stronger mixers make it depend on the whole prefix.
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.out_proj.weight.mul_(6.0)
    return model.eval()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQLEN), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def greedy_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens by re-running the whole sequence each step (no cache: the plain reference)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -n:]


@pytest.mark.parametrize("family", list(EXPECTED_PATTERNS))
def test_hf_to_ours_and_back(family: str, input_ids: torch.Tensor) -> None:
    hf = build_hf(family)
    ours = C.from_hf(hf)
    assert ours.config.pattern == EXPECTED_PATTERNS[family]
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        hf_logits = hf(input_ids).logits
        our_logits = ours(input_ids).logits
    assert our_logits.shape == hf_logits.shape == (2, SEQLEN, VOCAB)
    assert rel_err(our_logits, hf_logits) <= 1e-4

    # Greedy continuations: HF's plain loop against our cached generation (prefill + steps).
    expected = greedy_full_forward(hf, input_ids, 8)
    got = generate(ours, input_ids, max_new_tokens=8, temperature=0.0).tokens
    assert torch.equal(got, expected)
    assert all(len(set(row.tolist())) >= 3 for row in expected)  # not one token repeated

    back = C.to_hf(ours)
    assert type(back) is type(hf)
    with torch.no_grad():
        back_logits = back(input_ids).logits
    assert torch.equal(back_logits, hf_logits)
    original, returned = hf.state_dict(), back.state_dict()
    assert set(original) == set(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_jamba_router_keeps_topk_probabilities_unnormalized(input_ids: torch.Tensor) -> None:
    """Jamba's top-k weights do not sum to 1; the converted MoE must not renormalize them."""
    ours = C.from_hf(build_hf("jamba"))
    assert ours.config.moe.renormalize is False
    renormalized = dataclasses.replace(ours.config, moe=dataclasses.replace(ours.config.moe, renormalize=True))
    other = CausalLM(renormalized)
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert rel_err(other(input_ids).logits, ours(input_ids).logits) > 1e-3


def tiny_ours(pattern: str, **changes) -> ModelConfig:
    config = ModelConfig(d_model=64, pattern=pattern, vocab_size=100)  # padded to 104 rows
    config.mamba1.d_state = 8
    config.mamba2.d_state, config.mamba2.headdim, config.mamba2.chunk_size = 16, 16, 8
    config.attention.n_heads, config.attention.n_kv_heads = 4, 2
    config.mlp.hidden_size = config.moe.hidden_size = 96
    config.moe.n_experts = 4
    for key, value in changes.items():
        section, _, field = key.partition("__")
        setattr(getattr(config, section), field, value) if field else setattr(config, section, value)
    return config


OURS_TO_HF = {
    "mamba": tiny_ours("SSS"),
    "mamba2": tiny_ours("MM", tie_embeddings=False),
    "jamba": tiny_ours(jamba_pattern(4, 2, 1, 2, 0), mamba1__inner_norms=True),
    "llama": tiny_ours("*-*-", attention__rope=True, attention__rope_theta=500.0),
    "jamba-attention-only": tiny_ours("*-*-"),  # no RoPE: not a Llama, but Jamba can hold it
}


@pytest.mark.parametrize("name", list(OURS_TO_HF))
def test_ours_to_hf_and_back(name: str, input_ids: torch.Tensor) -> None:
    """Models built by us (vocabulary padded to a multiple of 8) convert with identical logits."""
    torch.manual_seed(0)
    config = OURS_TO_HF[name]
    ours = CausalLM(config).eval()
    perturb(ours)
    ids = input_ids % config.vocab_size
    hf = C.to_hf(ours)
    assert hf.config.model_type == name.split("-")[0]
    assert hf.config.vocab_size == config.vocab_size
    again = C.from_hf(hf)
    with torch.no_grad():
        expected = ours(ids).logits
        assert rel_err(hf(ids).logits, expected) <= 1e-4
        assert rel_err(again(ids).logits, expected) <= 1e-6
    assert again.config.pattern == config.pattern


@pytest.mark.parametrize(
    "family, layout",
    [(family, "safetensors") for family in EXPECTED_PATTERNS]
    + [("jamba", "bin"), ("mamba", "bin"), ("llama", "sharded"), ("jamba", "sharded")],
)
def test_load_pretrained_from_save_pretrained(family: str, layout: str, tmp_path: Path,
                                              input_ids: torch.Tensor) -> None:
    hf = build_hf(family)
    if layout == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        hf.save_pretrained(tmp_path)
    if layout == "bin":  # transformers 5 writes safetensors only; a 4.x-style .bin holds the same tensors
        state = C_load_safetensors(tmp_path / "model.safetensors")
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    ours = load_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_err(ours(input_ids).logits, hf(input_ids).logits) <= 1e-4


def C_load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_saved_jamba_layout_has_per_expert_weights(tmp_path: Path) -> None:
    """The on-disk layout differs from transformers 5's in-memory one; both must load."""
    hf = build_hf("jamba")
    hf.save_pretrained(tmp_path)
    saved = C_load_safetensors(tmp_path / "model.safetensors")
    assert "model.layers.1.feed_forward.experts.0.gate_proj.weight" in saved
    config = json.loads((tmp_path / "config.json").read_text())
    from_disk = C.state_dict_from_hf(config, saved)
    from_memory = C.state_dict_from_hf(hf.config, hf.state_dict())
    assert set(from_disk) == set(from_memory)
    assert all(torch.equal(from_disk[k], from_memory[k]) for k in from_disk)


def test_hf_defaults_match_transformers() -> None:
    """HF_DEFAULTS fills keys an older config.json may omit: they must be transformers' defaults."""
    for family, defaults in C.HF_DEFAULTS.items():
        cls = getattr(transformers, C.HF_CLASSES[family][0])
        fields = getattr(cls, "__dataclass_fields__", None)
        if fields:
            actual = {k: f.default for k, f in fields.items()}
        else:
            actual = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        for key, value in defaults.items():
            assert key in actual, f"{family}: transformers has no {key}"
            theirs = actual[key]
            if isinstance(value, tuple):
                theirs = tuple(theirs)
            assert theirs == value, f"{family}.{key}: ours {value!r}, transformers {theirs!r}"


def test_old_style_configs(input_ids: torch.Tensor) -> None:
    """4.x config.json spellings: rope_theta at the top, infinity as a string, keys left out."""
    llama = C.config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 1, "rope_theta": 123.0, "rope_scaling": None})
    assert llama.attention.rope_theta == 123.0 and llama.attention.n_kv_heads == 4
    assert llama.mlp.hidden_size == 11008  # transformers' default intermediate_size
    mamba2 = C.config_from_hf({"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16,
                               "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert mamba2.mamba2.dt_limit_max == math.inf and mamba2.mamba2.ngroups == 8


@pytest.mark.parametrize(
    "config, message",
    [
        (tiny_ours("M*"), "no HF transformers equivalent"),
        (tiny_ours("SH"), "no HF transformers equivalent"),
        (tiny_ours("SSSS", mamba1__inner_norms=True), "inner norms"),
        (tiny_ours("S-S-"), "inner_norms=True"),
        (tiny_ours("S-*-", mamba1__inner_norms=True, attention__rope=True), "no positional encoding"),
        (tiny_ours("*-*-", attention__rope=True, mlp__activation="gelu"), "SwiGLU"),
        (tiny_ours("*-*-", attention__rope=True, attention__qkv_bias=True), "attention_bias"),
        (tiny_ours("*-*-S-S-*-", mamba1__inner_norms=True), "follow no such rule"),
        (tiny_ours("S-SE", mamba1__inner_norms=True, moe__renormalize=True), "unnormalized"),
        (tiny_ours("S-SE", mamba1__inner_norms=True, moe__hidden_size=64), "intermediate_size"),
        (tiny_ours("MM", mamba2__norm_before_gate=True), "norm_before_gate"),
    ],
)
def test_inexpressible_models_raise(config: ModelConfig, message: str) -> None:
    with pytest.raises(C.ConversionError, match=message):
        C.config_to_hf(config)


@pytest.mark.parametrize(
    "hf_config, message",
    [
        ({"model_type": "gpt2"}, "not supported"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "llama3"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "silu"),
        ({"model_type": "mamba2", "hidden_size": 64, "num_heads": 4, "head_dim": 16}, "num_heads"),
    ],
)
def test_unsupported_hf_configs_raise(hf_config: dict, message: str) -> None:
    with pytest.raises(C.ConversionError, match=message):
        C.config_from_hf(hf_config)


# --------------------------------------------------------------------------------------------------
# mamba_ssm folders
# --------------------------------------------------------------------------------------------------

MAMBA_SSM_HYBRID = {
    "d_model": 64, "d_intermediate": 100, "n_layer": 3, "vocab_size": 100,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8},
    "attn_layer_idx": [1],
    "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 16, "rotary_emb_base": 777.0,
                 "rotary_emb_interleaved": True, "causal": True, "qkv_proj_bias": True, "out_proj_bias": False},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
MAMBA_SSM_130M_STYLE = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"d_state": 8},
                        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                        "pad_vocab_size_multiple": 8}


def _half_to_interleaved(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of convert_hf._interleaved_to_half, written out directly: feature j -> 2j, j + d/2 -> 2j+1."""
    shaped = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    out = torch.empty_like(shaped)
    out[:, 0::2], out[:, 1::2] = shaped[:, : head_dim // 2], shaped[:, head_dim // 2:]
    return out.reshape(weight.shape)


def to_mamba_ssm_state(model: CausalLM, data: dict) -> dict[str, torch.Tensor]:
    """Write our model's weights in mamba_ssm's MambaLMHeadModel layout (by hand, for the test)."""
    state = model.state_dict()
    mlp = data.get("d_intermediate", 0) > 0
    per_layer = 2 if mlp else 1
    attn = data.get("attn_cfg", {})
    out = {"backbone.embedding.weight": state["backbone.embedding.weight"],
           "backbone.norm_f.weight": state["backbone.norm_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(data["n_layer"]):
        k = per_layer * i
        ours, theirs = f"backbone.layers.{k}", f"backbone.layers.{i}"
        out[f"{theirs}.norm.weight"] = state[f"{ours}.norm.weight"]
        if i in data.get("attn_layer_idx", []):
            h, hkv = attn["num_heads"], attn["num_heads_kv"]
            d = data["d_model"] // h
            for suffix in ("weight", "bias"):
                q, k_, v = (state[f"{ours}.mixer.{p}_proj.{suffix}"] for p in "qkv")
                q, k_ = _half_to_interleaved(q, h, d), _half_to_interleaved(k_, hkv, d)
                out[f"{theirs}.mixer.in_proj.{suffix}"] = torch.cat([q, k_, v])
            out[f"{theirs}.mixer.out_proj.weight"] = state[f"{ours}.mixer.o_proj.weight"]
        else:
            for key, tensor in state.items():
                if key.startswith(f"{ours}.mixer."):
                    out[key.replace(ours, theirs, 1)] = tensor
        if mlp:
            ffn = f"backbone.layers.{k + 1}"
            out[f"{theirs}.norm2.weight"] = state[f"{ffn}.norm.weight"]
            out[f"{theirs}.mlp.fc1.weight"] = torch.cat([state[f"{ffn}.mixer.up_proj.weight"],
                                                         state[f"{ffn}.mixer.gate_proj.weight"]])
            out[f"{theirs}.mlp.fc2.weight"] = state[f"{ffn}.mixer.down_proj.weight"]
    return {k: v.clone() for k, v in out.items()}  # tied head: a copy, as torch.save would share it


def write_mamba_ssm_folder(folder: Path, data: dict) -> tuple[CausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    reference = CausalLM(C.config_from_mamba_ssm(data)).eval()
    perturb(reference)
    state = to_mamba_ssm_state(reference, data)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(data))
    return reference, state


@pytest.mark.parametrize("data", [MAMBA_SSM_HYBRID, MAMBA_SSM_130M_STYLE], ids=["mamba2-attn-mlp", "mamba1"])
def test_load_pretrained_mamba_ssm_folder(data: dict, tmp_path: Path, input_ids: torch.Tensor) -> None:
    reference, _ = write_mamba_ssm_folder(tmp_path, data)
    loaded = load_pretrained(tmp_path)
    assert loaded.backbone.embedding.weight.shape[0] == 104  # mamba_ssm pads the vocabulary to 8
    ids = input_ids % data["vocab_size"]
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, reference(ids).logits) <= 1e-6


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """flash_attn's RotaryEmbedding(interleaved=True) on x [B, L, H, D]: pairs (2j, 2j+1) rotate."""
    _, seqlen, _, dim = x.shape
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq  # [L, D/2]
    cos, sin = angles.cos()[None, :, None].float(), angles.sin()[None, :, None].float()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def test_mamba_ssm_attention_and_mlp_semantics(tmp_path: Path) -> None:
    """mamba_ssm's fused layouts, checked against their forward written from mamba_ssm's code:
    MHA (``in_proj`` rows q | k | v, kv as "(two hkv d)", interleaved rotary) and GatedMLP
    (``y, gate = fc1(x).chunk(2)``, ``fc2(y * silu(gate))``)."""
    _, state = write_mamba_ssm_folder(tmp_path, MAMBA_SSM_HYBRID)
    loaded = load_pretrained(tmp_path)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))

    h, hkv, d = 4, 2, 16
    qkv = F.linear(x, state["backbone.layers.1.mixer.in_proj.weight"], state["backbone.layers.1.mixer.in_proj.bias"])
    q, kv = qkv.split([h * d, 2 * hkv * d], dim=-1)
    q = q.reshape(2, 9, h, d)
    k, v = kv.reshape(2, 9, 2, hkv, d).unbind(dim=2)
    q, k = interleaved_rope(q, 777.0), interleaved_rope(k, 777.0)
    k, v = (t.repeat_interleave(h // hkv, dim=2) for t in (k, v))
    context = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    expected = F.linear(context.transpose(1, 2).reshape(2, 9, h * d), state["backbone.layers.1.mixer.out_proj.weight"])
    with torch.no_grad():
        got = loaded.backbone.layers[2].mixer(x)
    assert rel_err(got, expected) <= 1e-5

    y, gate = F.linear(x, state["backbone.layers.0.mlp.fc1.weight"]).chunk(2, dim=-1)
    expected = F.linear(y * F.silu(gate), state["backbone.layers.0.mlp.fc2.weight"])
    with torch.no_grad():
        got = loaded.backbone.layers[1].mixer(x)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rms_norm": False}, "rms_norm=False"),
        ({"attn_cfg": {**MAMBA_SSM_HYBRID["attn_cfg"], "d_conv": 4}}, "d_conv"),
        ({"attn_cfg": {**MAMBA_SSM_HYBRID["attn_cfg"], "rotary_emb_dim": 8}}, "rotary_emb_dim"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
        ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 64}}, "d_ssm"),
        ({"ssm_cfg": {"d_state": 8, "dt_typo": 1}}, "dt_typo"),
        ({"bidirectional": True}, "bidirectional"),
    ],
)
def test_unsupported_mamba_ssm_configs_raise(change: dict, message: str) -> None:
    with pytest.raises(C.ConversionError, match=message):
        C.config_from_mamba_ssm({**MAMBA_SSM_HYBRID, **change})


def test_load_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(CheckpointError, match="none of the layouts"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(C.ConversionError, match="gpt2"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_models()["llama"].to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(tmp_path)


def test_hf_weights_of_another_model_raise(tmp_path: Path) -> None:
    """A folder whose weights are another model's than its config says."""
    build_hf("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"shape mismatches: .*gate_proj.weight: checkpoint \(96, 64\) vs model \(80, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(tmp_path)
