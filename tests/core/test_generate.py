"""Generation: cached decoding equals the full forward, unequal prompts equal their solo runs, sampling."""

from __future__ import annotations

import pytest
import torch

from core.backbone import CausalLM
from core.config import ModelConfig
from core.generate import StreamingDetokenizer, generate, sample_next_token
from core.presets import PRESETS, get_preset

TINY_PRESETS = sorted(name for name in PRESETS if name.endswith("-tiny"))


def mixed_config() -> ModelConfig:
    """Every mixer in one pattern, small enough for a quick float64 run."""
    config = ModelConfig(d_model=32, pattern="SM*H-E", vocab_size=61)
    config.mamba2.headdim = 16
    config.mamba2.d_state = 8
    config.mamba2.chunk_size = 4
    config.attention.n_heads = 4
    config.attention.n_kv_heads = 2
    config.attention.rope = True
    config.moe.n_experts = 4
    config.hyena.max_seqlen = 64
    return config


def configs() -> list[tuple[str, ModelConfig]]:
    return [(name, get_preset(name)) for name in TINY_PRESETS] + [("mixed", mixed_config())]


def build(config: ModelConfig, dtype: torch.dtype = torch.float64) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(config).to(dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_tiny_presets_exist():
    families = {name.split("-")[0] for name in TINY_PRESETS}
    assert {"mamba1", "mamba2", "hyena", "hybrid", "jamba"} <= families
    assert any(name.startswith("transformer") for name in TINY_PRESETS)


@pytest.mark.parametrize("name,config", configs(), ids=[name for name, _ in configs()])
def test_prefill_and_steps_equal_full_forward(name: str, config: ModelConfig):
    model = build(config)
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 13)
        # A prefill in two parts (5 then 3 tokens), then one token at a time.
        parts = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:8], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 13)]
    stepped = torch.cat(parts, dim=1)
    assert stepped.shape == full.shape == (2, 13, config.vocab_size)
    assert rel_err(stepped, full) < 1e-10, name
    assert cache.seqlen_offset == 13


@pytest.mark.parametrize("name,config", configs(), ids=[name for name, _ in configs()])
def test_unequal_prompts_match_each_alone(name: str, config: ModelConfig):
    model = build(config)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 6, 2]]
    batched = generate(model, prompts, max_new_tokens=6, temperature=0).sequences()
    for prompt, continuation in zip(prompts, batched):
        alone = generate(model, [prompt], max_new_tokens=6, temperature=0).sequences()[0]
        assert continuation == alone, name


def test_decode_float32_close_to_forward():
    config = mixed_config()
    model = build(config, torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 9)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(9)], dim=1)
    assert rel_err(steps, full) < 1e-4


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_ssm_states(state_dtype):
    # The Mamba layers' state in 16 bits (as mamba_ssm keeps it): allocated so, rounded once a token (the
    # logits move, a little), and the graph decoder's path gives the eager path's tokens.
    from core.cuda_graph import CUDAGraphDecoder

    config = mixed_config()
    model = build(config, torch.float32)
    cache = model.allocate_cache(2, 12, ssm_state_dtype=state_dtype)
    kinds = {c: type(layer).__name__ for c, layer in zip(config.pattern, cache.layers)}
    assert [layer.ssm_state.dtype for c, layer in zip(config.pattern, cache.layers) if c in "SM"] == [state_dtype] * 2
    assert kinds["*"] == "KVCache" and cache.layers[config.pattern.index("*")].key.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ref_cache = model.allocate_cache(2, 12)
        model(ids[:, :5], cache=ref_cache)
        want = torch.cat([model(ids[:, t:t + 1], cache=ref_cache).logits for t in range(5, 9)], dim=1)
        model(ids[:, :5], cache=cache)
        got = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 9)], dim=1)
    assert 0 < rel_err(got, want) < 2e-2
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8]]
    eager = generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=False,
                     ssm_state_dtype=state_dtype).sequences()
    decoder = CUDAGraphDecoder(model, capture=False)
    graph_path = generate(model, prompts, max_new_tokens=6, temperature=0, ssm_state_dtype=state_dtype,
                          cuda_graph=decoder).sequences()
    assert eager == graph_path
    (runner,) = decoder.runners.values()
    assert runner.cache.layers[0].ssm_state.dtype == state_dtype
    with pytest.raises(ValueError, match="bfloat16"):
        generate(model, prompts, max_new_tokens=2, ssm_state_dtype=torch.int8)


def test_chunked_prefill_equals_whole_prefill():
    model = build(mixed_config())
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8]]
    whole = generate(model, prompts, max_new_tokens=5, temperature=0).sequences()
    chunked = generate(model, prompts, max_new_tokens=5, temperature=0, prefill_chunk_size=3).sequences()
    assert whole == chunked


def test_sampling_is_seeded_and_greedy_limits():
    model = build(get_preset(TINY_PRESETS[0]))
    prompts = [[1, 2, 3], [4, 5, 6]]
    kwargs = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
    first = generate(model, prompts, seed=123, **kwargs).sequences()
    assert first == generate(model, prompts, seed=123, **kwargs).sequences()
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0).sequences()
    assert generate(model, prompts, max_new_tokens=8, top_k=1, seed=7).sequences() == greedy
    assert generate(model, prompts, max_new_tokens=8, top_p=1e-6, seed=7).sequences() == greedy


def test_stop_tokens_end_each_sequence():
    model = build(get_preset(TINY_PRESETS[0]))
    prompts = [[1, 2, 3], [7, 8]]
    greedy = generate(model, prompts, max_new_tokens=6, temperature=0)
    stop = int(greedy.tokens[0, 2])
    out = generate(model, prompts, max_new_tokens=6, temperature=0, stop_tokens=[stop], pad_token_id=-1)
    for row, seq in zip(greedy.sequences(), out.sequences()):
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert seq == expected
    assert (out.tokens[0, 3:] == -1).all()


def test_streaming_callback_sees_every_token():
    model = build(get_preset(TINY_PRESETS[0]))
    seen: list[torch.Tensor] = []
    out = generate(model, [[1, 2]], max_new_tokens=4, temperature=0, on_token=lambda step, tok: seen.append(tok))
    assert torch.cat(seen).tolist() == out.sequences()[0]


def test_sample_next_token_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)
    top2 = sample_next_token(logits, temperature=1.0, top_k=2)
    assert set(top2.tolist()) == {1, 2}
    probs = logits[0].softmax(-1)
    # top_p just above p(1) + p(2): the nucleus is {1, 2, 3}.
    nucleus = sample_next_token(logits, temperature=1.0, top_p=float(probs[1] + probs[2]) + 1e-3)
    assert set(nucleus.tolist()) == {1, 2, 3}
    assert sample_next_token(logits[:1], temperature=0).item() == 1


def test_bad_generation_arguments():
    model = build(get_preset(TINY_PRESETS[0]))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=1, temperature=-1)


def test_streaming_detokenizer_keeps_multibyte_characters_whole():
    """Byte-level tokens (one byte each): characters of 2-4 bytes arrive over several tokens. The pieces
    never hold a broken character, join to the full text, and each push decodes only a short window."""
    text = "héllo wörld: 日本語 🙂🙂 ok"
    windows: list[int] = []

    def decode(ids: list[int]) -> str:
        windows.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")

    stream = StreamingDetokenizer(decode)
    pieces = [stream.push(b) for b in text.encode("utf-8")]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some pushes had to wait for the rest of a character
    assert max(windows) <= 8  # a window, not the whole sequence


def test_streaming_detokenizer_flushes_an_unfinished_tail():
    stream = StreamingDetokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert stream.push(ord("a")) == "a"
    assert stream.push(0xE6) == ""  # the first of three bytes
    assert stream.flush() == "\ufffd"  # what the final decode shows too
