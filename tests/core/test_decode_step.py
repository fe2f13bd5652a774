"""The capture-safe decoding step and the CUDA-graph decoder.

CPU: the step (fused residual + norm, device-side counters, fixed-shape MoE, masked whole-buffer
attention and Hyena) equals the full forward of each unpadded row, for every mixer family, after a
left-padded prefill; the graph decoder's code path (static buffers, run eagerly with capture=False)
gives generate(cuda_graph=False)'s tokens, reuses its runners and re-captures after a weight change;
the cache's reset / host counters. CUDA (skipped here): real capture equals eager decoding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from core.backbone import CausalLM
from core.cache import InferenceCache, KVCache
from core.config import AttentionConfig, HyenaConfig, Mamba1Config, Mamba2Config, ModelConfig, MoEConfig
from core import cuda_graph
from core.cuda_graph import CUDAGraphDecoder, decode_step, graph_unsafe_reason
from core.generate import generate, left_pad
from core.presets import get_preset


def config(pattern: str, **overrides) -> ModelConfig:
    """A small model: GQA + RoPE attention, Mamba-2 with 2 groups, MoE 4 experts top-2, Hyena."""
    values = dict(
        d_model=32, pattern=pattern, vocab_size=61,
        mamba1=Mamba1Config(d_state=8),
        mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=2, chunk_size=4),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope=True),
        moe=MoEConfig(n_experts=4, top_k=2, hidden_size=48),
        hyena=HyenaConfig(filter_order=16, max_seqlen=64),
    )
    values.update(overrides)
    return ModelConfig(**values)


FAMILIES = {
    "mamba1": config("SS"),
    "mamba2": config("MM"),
    "attention-gqa-rope": config("*-*-"),
    "attention-mha-norope": config("*-", attention=AttentionConfig(n_heads=4, rope=False, qkv_bias=True)),
    # Dropless: with a capacity, tokens of a batch compete for experts, so a row differs from itself alone
    # (the fixed-shape routing's capacity is tested against the dispatch path in test_moe.py).
    "moe": config("*E", moe=MoEConfig(n_experts=4, top_k=2, hidden_size=48)),
    "hyena": config("H-H-"),
    "jamba-like": config("S-S*SE", mamba1=Mamba1Config(d_state=8, inner_norms=True, conv_bias=True)),
    "hybrid": config("M*M-"),
}


def build(cfg: ModelConfig, dtype: torch.dtype = torch.float64) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(cfg).to(dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_step_after_padded_prefill_equals_each_row_alone(name: str, chunk: int | None):
    """generate()'s sequence of calls: a left-padded prefill (whole, or in chunks with one-token chunks
    of pads), then decode_step per token; every logit equals the row's own unpadded full forward."""
    model = build(FAMILIES[name])
    torch.manual_seed(1)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 2, 4)]
    new = torch.randint(0, 61, (3, 4))  # teacher-forced continuation
    ids, mask = left_pad(prompts, pad_token_id=0)
    width = ids.shape[1]
    with torch.no_grad():
        cache = model.allocate_cache(3, width + new.shape[1])
        chunk_size = chunk or width
        for start in range(0, width, chunk_size):
            part = slice(start, start + chunk_size)
            prefill = model(ids[:, part], cache=cache, padding_mask=mask[:, part], num_last_tokens=1).logits[:, -1]
        stepped = [prefill] + [decode_step(model, new[:, t], cache) for t in range(new.shape[1])]
    assert cache.seqlen_offset == width + new.shape[1]
    stepped = torch.stack(stepped, dim=1)  # [B, 1 + new, V]: predictions after the prompt and each token
    for row, prompt in enumerate(prompts):
        alone = torch.tensor(prompt + new[row].tolist())[None]
        with torch.no_grad():
            full = model(alone).logits[0, len(prompt) - 1:]
        assert rel_err(stepped[row], full) < 1e-9, name


@pytest.mark.parametrize("name", ["mamba1", "attention-gqa-rope", "hyena", "jamba-like"])
def test_fused_step_equals_the_models_own_step_in_float32(name: str):
    """The fused residual + norm of decode_step is Block.forward's arithmetic."""
    model = build(FAMILIES[name], torch.float32)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        a, b = model.allocate_cache(2, 9), model.allocate_cache(2, 9)
        model(ids, cache=a)
        model(ids, cache=b)
        for token in torch.randint(0, 61, (3, 2)):
            fused = decode_step(model, token, a)
            plain = model(token[:, None], cache=b).logits[:, -1]
            assert rel_err(fused, plain) < 1e-6


# --------------------------------------------------------------------------------------------------
# The graph decoder's code path on CPU (capture=False: the static-buffer step run eagerly)
# --------------------------------------------------------------------------------------------------

GENERATE_CASES = [
    ("mamba1-tiny", dict(temperature=0)),
    ("mamba2-tiny", dict(temperature=1.0, top_p=0.9, seed=3)),
    ("transformer++-tiny", dict(temperature=0.8, top_k=5, seed=4)),
    ("hybrid-tiny", dict(temperature=0)),
    ("jamba-tiny", dict(temperature=1.0, seed=5)),
    ("hyena-tiny", dict(temperature=0)),
]


@pytest.mark.parametrize("preset,kwargs", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_graph_code_path_equals_eager_generate(preset: str, kwargs: dict):
    model = build(get_preset(preset), torch.float32)
    prompts = [[5, 9, 2, 7, 1], [4], [11, 6, 2]]
    eager = generate(model, prompts, max_new_tokens=6, cuda_graph=False, **kwargs)
    decoder = CUDAGraphDecoder(model, capture=False)
    graphed = generate(model, prompts, max_new_tokens=6, cuda_graph=decoder, **kwargs)
    assert graphed.sequences() == eager.sequences()
    assert torch.equal(graphed.lengths, eager.lengths) and not graphed.cuda_graph
    # A second call of the same shape reuses the runner (its cache cleared in between).
    again = generate(model, prompts, max_new_tokens=6, cuda_graph=decoder, **kwargs)
    assert again.sequences() == eager.sequences() and decoder.captures == 1


@pytest.mark.parametrize("n_prompts", [3, 1])  # with 1, every row stops and the loop ends early
def test_graph_code_path_with_stop_tokens_and_streaming(n_prompts: int):
    model = build(get_preset("hybrid-tiny"), torch.float32)
    prompts = [[1, 2, 3], [7, 8], [9]][:n_prompts]
    greedy = generate(model, prompts, max_new_tokens=7, temperature=0, cuda_graph=False)
    stop = int(greedy.tokens[0, 2])
    decoder = CUDAGraphDecoder(model, capture=False)
    for interval in (1, 3, 8):  # the output must not depend on how often the loop checks
        seen: list[torch.Tensor] = []
        out = generate(model, prompts, max_new_tokens=7, temperature=0, stop_tokens=[stop], pad_token_id=-1,
                       cuda_graph=decoder, stop_check_interval=interval,
                       on_token=lambda step, tok: seen.append(tok.clone()))
        for row, seq in zip(greedy.sequences(), out.sequences()):
            assert seq == (row[: row.index(stop) + 1] if stop in row else row)
        assert (out.tokens[0, 3:] == -1).all()
        # The streamed tokens are the output's, pads after a stop included, for every step that ran.
        streamed = torch.stack(seen, dim=1)
        assert streamed.shape[1] >= int(out.lengths.max())
        assert torch.equal(streamed, out.tokens[:, : streamed.shape[1]])


def test_runner_reuse_keys_and_recapture_after_weight_change():
    mamba = build(get_preset("mamba1-tiny"), torch.float32)
    decoder = CUDAGraphDecoder(mamba, capture=False)
    first = generate(mamba, [[1, 2, 3]], max_new_tokens=4, temperature=0, cuda_graph=decoder)
    # A Mamba-only cache has no length-dependent tensor: one runner serves every length.
    generate(mamba, [[1, 2, 3, 4, 5, 6]], max_new_tokens=9, temperature=0, cuda_graph=decoder)
    assert decoder.captures == 1
    generate(mamba, [[1, 2], [3, 4]], max_new_tokens=4, temperature=0, cuda_graph=decoder)  # batch 2
    assert decoder.captures == 2 and len(decoder.runners) == 2
    with torch.no_grad():
        for layer in mamba.backbone.layers:
            layer.mixer.A_log.add_(0.5)  # an optimizer step: derived constants (A) change
    changed = generate(mamba, [[1, 2, 3]], max_new_tokens=4, temperature=0, cuda_graph=decoder)
    assert decoder.captures == 3 and len(decoder.runners) == 1
    assert changed.sequences() == generate(mamba, [[1, 2, 3]], max_new_tokens=4, temperature=0,
                                           cuda_graph=False).sequences()
    assert first.sequences()  # (the first call ran)

    attn = build(get_preset("transformer++-tiny"), torch.float32)
    decoder = CUDAGraphDecoder(attn, capture=False, max_graphs=1, length_bucket=1)
    generate(attn, [[1, 2, 3]], max_new_tokens=4, temperature=0, cuda_graph=decoder)
    generate(attn, [[1, 2, 3]], max_new_tokens=5, temperature=0, cuda_graph=decoder)  # a longer KV cache
    assert decoder.captures == 2 and len(decoder.runners) == 1  # least recently used dropped
    # With the default bucket of 128 positions, nearby lengths share one runner (and its KV cache).
    decoder = CUDAGraphDecoder(attn, capture=False)
    outs = [generate(attn, [[1, 2, 3]], max_new_tokens=n, temperature=0, cuda_graph=decoder) for n in (4, 9)]
    assert decoder.captures == 1
    assert next(iter(decoder.runners.values())).cache.layers[0].key.shape[2] == 128
    assert outs[1].sequences()[0][:4] == outs[0].sequences()[0]


@pytest.mark.parametrize("preset", ["mamba1-tiny", "mamba2-tiny", "hybrid-tiny"])
def test_prefill_of_a_repeated_prompt_length_takes_the_static_path(preset: str):
    """The second prompt batch of a length runs the static-buffer prefill (a graph on CUDA); tokens equal
    the eager ones. Padded batches, prompts past PREFILL_GRAPH_MAX_TOKENS and models with mixers outside
    Mamba / attention / MLP keep the eager prefill."""
    model = build(get_preset(preset), torch.float32)
    decoder = CUDAGraphDecoder(model, capture=False)
    prompts = torch.tensor([[5, 9, 2, 7, 1], [4, 4, 8, 1, 0]])
    eager = generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=False)
    outs = [generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=decoder) for _ in range(3)]
    runner = next(iter(decoder.runners.values()))
    assert list(runner.prefills) == [5]  # kept from the second call on
    assert all(out.sequences() == eager.sequences() for out in outs)
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=2, cuda_graph=decoder)  # padded
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=2, cuda_graph=decoder)
    assert list(runner.prefills) == [5]
    long = torch.randint(0, 200, (2, cuda_graph.PREFILL_GRAPH_MAX_TOKENS // 2 + 1))
    for _ in range(2):
        generate(model, long, max_new_tokens=1, cuda_graph=decoder)
    assert 5 in runner.prefills and long.shape[1] not in runner.prefills
    with pytest.raises(ValueError, match="cleared cache"):
        runner.prefill(prompts)  # the cache holds the last generate call's tokens


def test_prefill_lengths_kept_per_runner(monkeypatch):
    monkeypatch.setattr(cuda_graph, "PREFILL_GRAPHS", 2)
    model = build(get_preset("mamba1-tiny"), torch.float32)
    decoder = CUDAGraphDecoder(model, capture=False)
    for length in (3, 3, 4, 4, 5, 5, 3):
        out = generate(model, torch.arange(1, length + 1)[None], max_new_tokens=2, temperature=0,
                       cuda_graph=decoder)
        assert out.sequences() == generate(model, torch.arange(1, length + 1)[None], max_new_tokens=2,
                                           temperature=0, cuda_graph=False).sequences()
    runner = next(iter(decoder.runners.values()))
    assert list(runner.prefills) == [5, 3]  # least recently used (4) dropped; 3 seen before: kept again
    assert cuda_graph.prefill_graph_unsafe_reason(build(get_preset("hyena-tiny"))) is not None
    assert cuda_graph.prefill_graph_unsafe_reason(build(get_preset("jamba-tiny"))) is not None  # MoE
    assert cuda_graph.prefill_graph_unsafe_reason(model) is None


def test_prefill_capture_records_no_autograd(monkeypatch):
    """The prefill graph is captured under no_grad. Its caller enters inference_mode(False), which turns
    grad mode back on; a capture with autograd on saved every activation for a backward (32 GB for a
    64 x 512 prompt of mamba1-130m). CUDA's stream and graph calls are stubbed, so that the capture path
    runs here."""
    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def replay(self):
            pass

    captures = []

    @contextlib.contextmanager
    def graph(cuda_graph):
        captures.append(torch.is_grad_enabled())
        yield

    for name, value in (("Stream", Stub), ("CUDAGraph", Stub), ("current_stream", Stub),
                        ("stream", lambda stream: contextlib.nullcontext()), ("graph", graph)):
        monkeypatch.setattr(torch.cuda, name, value)
    model = build(get_preset("mamba1-tiny"), torch.float32)
    runner = CUDAGraphDecoder(model, capture=False).runner(1, 16)
    runner.capture = True  # the capture path, on the stubs
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    for _ in range(2):  # the second prompt of a length is captured
        runner.begin(16)
        runner.prefill(torch.tensor([[5, 9, 2, 7, 1]]))
    assert captures == [False] and modes == [False, False, False]  # eager, warm-up, capture
    assert runner.prefills[5][2] is not None


def test_runner_refuses_to_step_past_its_cache():
    model = build(get_preset("transformer++-tiny"), torch.float32)
    runner = CUDAGraphDecoder(model, capture=False).runner(1, 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=runner.cache)
    runner.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="max_seqlen=3"):
        runner.step(torch.tensor([4]))
    assert runner.cache.seqlen_offset == 3 and runner.cache.layers[0].length == 3


def test_graph_mode_arguments():
    model = build(get_preset("mamba1-tiny"), torch.float32)
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, [[1]], max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        generate(model, [[1]], max_new_tokens=2, cuda_graph="yes")
    other = build(get_preset("mamba1-tiny"), torch.float32)
    with pytest.raises(ValueError, match="another model"):
        generate(model, [[1]], max_new_tokens=2, cuda_graph=CUDAGraphDecoder(other, capture=False))
    assert generate(model, [[1]], max_new_tokens=2, cuda_graph="auto").cuda_graph is False  # CPU: eager
    assert graph_unsafe_reason(model) is None


def test_models_without_a_safe_step_are_refused():
    from core.multiscale import MultiScaleConfig, MultiScaleLM

    cfg = ModelConfig(d_model=8, pattern="S-", vocab_size=16)
    cfg.mamba1.d_state = 4
    model = MultiScaleLM(MultiScaleConfig(model=cfg, pools=[2], expand=2))
    assert "not a core.backbone.CausalLM" in graph_unsafe_reason(model)
    with pytest.raises(ValueError, match="cuda_graph=False"):
        CUDAGraphDecoder(model, capture=False)
    # Its eager decoding goes through its own forward.
    out = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0, cuda_graph="auto")
    assert len(out.sequences()[0]) == 3


# --------------------------------------------------------------------------------------------------
# The cache's device counters, reset and host counters
# --------------------------------------------------------------------------------------------------

def test_cache_counters_reset_and_set_seqlen():
    model = build(config("S*HL"))  # L: S4D, whose cache class has no reset() (zeroed generically)
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    cache = model.allocate_cache(2, 6)
    with torch.no_grad():
        model(ids, cache=cache, padding_mask=mask)
        decode_step(model, torch.tensor([5, 6]), cache)
    kv: KVCache = cache.layers[1]
    assert kv.positions.tolist() == [4, 2] and kv.fill.tolist() == [4] and kv.length == 4
    assert kv.valid[:, :4].tolist() == [[True] * 4, [False, False, True, True]] and kv.has_padding
    assert cache.layers[2].index.tolist() == [4] and cache.layers[2].length == 4
    assert cache.seqlen_offset == 4

    cache.set_seqlen(5)
    assert kv.length == 5 and cache.layers[2].length == 5 and cache.seqlen_offset == 5
    with pytest.raises(ValueError, match="outside"):
        cache.set_seqlen(7)
    cache.reset()
    assert cache.seqlen_offset == 0 and kv.length == 0 and not kv.has_padding
    fresh = model.allocate_cache(2, 6)
    for layer, new in zip(cache.layers, fresh.layers):
        for key, value in vars(new).items():
            old = getattr(layer, key)
            for a, b in zip(old if isinstance(old, list) else [old], value if isinstance(value, list) else [value]):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert cache.shape_key() == fresh.shape_key()
    assert cache.shape_key() != model.allocate_cache(2, 7).shape_key()  # the KV buffers grow
    assert isinstance(cache, InferenceCache)


# --------------------------------------------------------------------------------------------------
# CUDA: real capture (skipped without a GPU)
# --------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("preset", ["mamba1-tiny", "mamba2-tiny", "transformer++-tiny", "hybrid-tiny",
                                    "jamba-tiny", "hyena-tiny"])
def test_cuda_graph_generate_equals_eager(preset: str):
    torch.manual_seed(0)
    model = CausalLM(get_preset(preset)).to("cuda", torch.bfloat16).eval()
    prompts = [[5, 9, 2, 7, 1, 3], [4], [11, 6, 2]]
    eager = generate(model, prompts, max_new_tokens=12, temperature=0, cuda_graph=False)
    graphed = generate(model, prompts, max_new_tokens=12, temperature=0, cuda_graph=True)
    assert graphed.cuda_graph
    assert graphed.sequences() == eager.sequences()
    sampled = [generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1, cuda_graph=g)
               for g in (False, True)]
    assert sampled[0].sequences() == sampled[1].sequences()


@cuda
@pytest.mark.parametrize("preset", ["mamba1-tiny", "mamba2-tiny", "hybrid-tiny"])
def test_cuda_prefill_graph_equals_eager(preset: str):
    torch.manual_seed(0)
    model = CausalLM(get_preset(preset)).to("cuda", torch.bfloat16).eval()
    prompts = torch.randint(0, 256, (2, 37), device="cuda")
    eager = generate(model, prompts, max_new_tokens=12, temperature=0, cuda_graph=False)
    decoder = CUDAGraphDecoder(model)
    outs = [generate(model, prompts, max_new_tokens=12, temperature=0, cuda_graph=decoder) for _ in range(3)]
    assert next(iter(decoder.runners.values())).prefills[37][2] is not None  # captured
    assert all(out.sequences() == eager.sequences() for out in outs)


@cuda
def test_cuda_chunked_prefill_without_pads_equals_whole_prefill():
    """The lower-right causal path of unpadded prefill chunks (flash kernels on GPU)."""
    torch.manual_seed(0)
    model = CausalLM(get_preset("hybrid-tiny")).to("cuda").eval()
    prompt = torch.randint(0, 256, (2, 40), device="cuda")
    whole = generate(model, prompt, max_new_tokens=6, temperature=0)
    chunked = generate(model, prompt, max_new_tokens=6, temperature=0, prefill_chunk_size=16)
    assert whole.sequences() == chunked.sequences()
    with torch.no_grad():
        full = model(prompt).logits
        cache = model.allocate_cache(2, 40)
        parts = torch.cat([model(prompt[:, s:s + 16], cache=cache).logits for s in range(0, 40, 16)], dim=1)
    assert rel_err(parts, full) < 1e-4
