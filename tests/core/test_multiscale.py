"""The SaShiMi-style multi-scale model: causality (exact zero gradients into the future), the streaming
cached forward equal to the whole forward for any chunking, generation, and the errors."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig, S4DConfig
from core.generate import generate
from core.multiscale import MultiScaleConfig, MultiScaleLM


def small(pattern: str, pools=(4, 2)) -> MultiScaleConfig:
    model = ModelConfig(d_model=8, pattern=pattern, vocab_size=16, s4d=S4DConfig(d_state=4))
    model.mamba1.d_state = 4
    model.mamba2.headdim, model.mamba2.d_state, model.mamba2.chunk_size = 8, 8, 4
    model.attention.n_heads = 2
    model.hyena.max_seqlen, model.hyena.filter_order = 64, 8
    return MultiScaleConfig(model=model, pools=list(pools), expand=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("pattern", ["L-", "S-", "M", "*-", "H"])
@pytest.mark.parametrize("chunks", [(1,) * 11, (7, 1, 1, 1, 1, 1, 9, 1, 2), (3, 5, 13)])
def test_cached_forward_equals_the_whole_forward(pattern: str, chunks: tuple[int, ...]):
    torch.manual_seed(0)
    model = MultiScaleLM(small(pattern)).eval()
    total = sum(chunks)
    ids = torch.randint(0, 16, (2, total))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, total)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(ids[:, start:start + n], cache=cache).logits)
            start += n
    assert cache.seqlen_offset == total
    assert rel(torch.cat(parts, 1), full) < 2e-5


@pytest.mark.parametrize("pools", [(4, 2), (2,), (3, 2, 2)])
def test_no_sample_sees_the_future(pools):
    torch.manual_seed(1)
    model = MultiScaleLM(small("L-", pools)).double()
    length = 19  # not a multiple of the pooling: the training forward pads at the end
    x = model.embedding(torch.randint(0, 16, (1, length))).detach().requires_grad_()
    hidden = model._level(0, torch.nn.functional.pad(x, (0, 0, 0, 24 - length)), {})[:, :length]
    for t in (0, 3, 4, 7, 8, 17):
        (grad,) = torch.autograd.grad(hidden[0, t].sum(), x, retain_graph=True)
        # Nothing from later samples (up to the FFT convolution's float64 rounding, ~1e-16).
        assert grad[0, t + 1:].abs().max() < 1e-12 * grad[0, : t + 1].abs().max()
        assert grad[0, t].abs().max() > 0


def test_backward_reaches_every_parameter():
    torch.manual_seed(2)
    model = MultiScaleLM(small("L-"))
    ids = torch.randint(0, 16, (2, 17))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


def test_generate_matches_greedy_whole_forward_and_cache_limit():
    torch.manual_seed(3)
    model = MultiScaleLM(small("S-")).eval()
    prompt = torch.randint(0, 16, (2, 6))
    out = generate(model, prompt, max_new_tokens=11, temperature=0)
    whole = torch.cat([prompt, out.tokens], 1)
    assert torch.equal(model(whole[:, :-1]).logits[:, 5:].argmax(-1), out.tokens)

    cache = model.allocate_cache(2, 8)
    model(prompt, cache=cache)
    with pytest.raises(ValueError, match="max_seqlen=8"):
        model(prompt[:, :3], cache=cache)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="pools"):
        MultiScaleLM(small("L-", pools=(4, 1)))
    config = small("M")
    config.model.mamba2.headdim = 12  # divides no level's width
    with pytest.raises(ValueError, match="(?s)level 0.*headdim"):
        MultiScaleLM(config)
    config = small("L-")
    config.model.loss_chunk_size = 64  # a CausalLM setting the multi-scale model would silently ignore
    with pytest.raises(ValueError, match="loss_chunk_size"):
        MultiScaleLM(config)
    model = MultiScaleLM(small("L-"))
    with pytest.raises(ValueError, match="left padding"):
        model(torch.zeros(1, 4, dtype=torch.long), padding_mask=torch.tensor([[False, True, True, True]]))
    data = small("L-").to_dict()
    assert MultiScaleConfig.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="poolz"):
        MultiScaleConfig.from_dict({**data, "poolz": [2]})
