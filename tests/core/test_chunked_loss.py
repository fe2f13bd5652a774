"""The chunked LM head + cross-entropy: equal to CausalLM's loss and gradients, and never as large as
the logits (the largest tensor any op creates is watched with a dispatch mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from core.backbone import CausalLM
from core.chunked_loss import chunked_cross_entropy, chunked_lm_loss, lm_loss
from core.presets import get_preset


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def batch(vocab: int, seqlen: int = 40, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, seqlen))
    labels = torch.randint(0, vocab, (rows, seqlen))
    labels[0, :5] = -100
    labels[1, 8:30] = -100  # with chunk 7 over the flattened rows, whole chunks have no label
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["hybrid-tiny", "jamba-tiny", "mamba1-tiny"])
@pytest.mark.parametrize("chunk_size", [7, 16, 1000])
def test_equals_the_unchunked_loss_and_gradients(name, chunk_size):
    config = get_preset(name)
    model = CausalLM(config)
    ids, labels = batch(config.vocab_size)

    expected = model(ids, labels=labels)
    expected.loss.backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    got = chunked_lm_loss(model, ids, labels, chunk_size=chunk_size)
    got.loss.backward()
    got_grads = grads(model)

    torch.testing.assert_close(got.ce_loss, expected.ce_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got.aux_losses.keys() == expected.aux_losses.keys()
    assert got.tokens == int((labels != -100).sum())
    assert got_grads.keys() == expected_grads.keys()
    for key in expected_grads:
        torch.testing.assert_close(got_grads[key], expected_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_untied_head_and_autocast():
    config = get_preset("hybrid-tiny")  # untied embeddings
    assert not config.tie_embeddings
    model = CausalLM(config)
    ids, labels = batch(config.vocab_size, seqlen=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids, labels=labels).loss
        got = chunked_lm_loss(model, ids, labels, chunk_size=10).loss
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    got.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_lm_loss_without_chunks_is_the_model_forward():
    config = get_preset("mamba2-tiny")
    model = CausalLM(config)
    ids, labels = batch(config.vocab_size, seqlen=16)
    out = lm_loss(model, ids, labels, chunk_size=0)
    torch.testing.assert_close(out.loss, model(ids, labels=labels).loss)
    torch.testing.assert_close(lm_loss(model, ids, labels, chunk_size=5).loss, out.loss, rtol=1e-5, atol=1e-6)


def test_all_labels_ignored_gives_zero():
    config = get_preset("mamba2-tiny")
    model = CausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    out = chunked_lm_loss(model, ids, torch.full_like(ids, -100), chunk_size=4)
    assert out.tokens == 0 and float(out.ce_loss) == 0.0


def test_never_materializes_the_logits():
    torch.manual_seed(0)
    length, d_model, vocab, chunk = 1024, 32, 256, 128
    hidden = torch.randn(1, length, d_model, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, d_model)).requires_grad_()
    labels = torch.randint(0, vocab, (1, length))

    plain = LargestTensor()
    with plain:
        logits = F.linear(hidden, weight).float()
        F.cross_entropy(logits.view(-1, vocab), labels.view(-1), reduction="sum").backward()
    assert plain.largest >= length * vocab  # the reference does build [L, V]

    expected_grad = hidden.grad.clone()
    hidden.grad = None
    chunked = LargestTensor()
    with chunked:
        chunked_cross_entropy(hidden, weight, labels, vocab, chunk_size=chunk).backward()
    bound = max(chunk * vocab, length * d_model, vocab * d_model)
    assert chunked.largest <= bound, f"an op made a tensor of {chunked.largest} elements (bound {bound})"
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_padded_vocab_rows_are_dropped():
    # The head has 8 rows, the vocabulary 5: the padded rows must not enter the softmax.
    hidden = torch.randn(2, 6, 4)
    weight = torch.randn(8, 4)
    labels = torch.randint(0, 5, (2, 6))
    expected = F.cross_entropy((hidden @ weight.T)[..., :5].reshape(-1, 5), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 5, chunk_size=5), expected)


def test_errors_name_the_problem():
    model = CausalLM(get_preset("mamba2-tiny"))
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_lm_loss(model, ids, ids, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        chunked_lm_loss(model, ids, ids[:, :4])
    with pytest.raises(ValueError, match=">= 0"):
        lm_loss(model, ids, ids, chunk_size=-1)
    with pytest.raises(TypeError, match="needs a core.backbone.CausalLM"):
        chunked_lm_loss(torch.nn.Linear(2, 2), ids, ids)
