"""The chunked LM head + cross-entropy inside CausalLM (``ModelConfig.loss_chunk_size``): equal to the
unchunked loss and gradients, never as large as the logits (the largest tensor any op creates is
watched with a dispatch mode), and leaving evaluation, generation and the state dict as they were."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from core.backbone import CausalLM, validate_config
from core.chunked_loss import IGNORE_INDEX, chunked_cross_entropy
from core.config import ModelConfig
from core.generate import generate
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


def pair(name: str, chunk_size: int, **changes) -> tuple[CausalLM, CausalLM]:
    """(unchunked, chunked) models of the preset with the same weights."""
    config = dataclasses.replace(get_preset(name), **changes)
    torch.manual_seed(0)
    plain = CausalLM(config)
    chunked = CausalLM(dataclasses.replace(config, loss_chunk_size=chunk_size))
    chunked.load_state_dict(plain.state_dict(), strict=True)
    return plain, chunked


def batch(vocab: int, seqlen: int = 41, rows: int = 2, pad: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Ids, labels with ignored runs (whole chunks of 7 flattened positions without a label) and, with
    ``pad`` > 0, row 1 left-padded by that many positions (their ids garbage, their labels ignored)."""
    generator = torch.Generator().manual_seed(seqlen)
    ids = torch.randint(0, vocab, (rows, seqlen), generator=generator)
    labels = torch.randint(0, vocab, (rows, seqlen), generator=generator)
    labels[0, :5] = IGNORE_INDEX
    labels[1, 8:30] = IGNORE_INDEX
    mask = None
    if pad:
        mask = torch.ones(rows, seqlen, dtype=torch.bool)
        mask[1, :pad] = False
        ids[1, :pad] = -1  # never looked up
        labels[1, :pad] = IGNORE_INDEX
    return ids, labels, mask


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(plain: CausalLM, chunked: CausalLM, ids, labels, mask=None) -> None:
    expected = plain(ids, labels=labels, padding_mask=mask)
    expected.loss.backward()
    got = chunked(ids, labels=labels, padding_mask=mask)
    got.loss.backward()
    assert got.logits is None and expected.logits is not None
    torch.testing.assert_close(got.ce_loss, expected.ce_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got.aux_losses.keys() == expected.aux_losses.keys()
    for key in expected.aux_losses:
        torch.testing.assert_close(got.aux_losses[key], expected.aux_losses[key], rtol=1e-5, atol=1e-7)
    expected_grads, got_grads = grads(plain), grads(chunked)
    assert got_grads.keys() == expected_grads.keys() and expected_grads
    for key in expected_grads:
        torch.testing.assert_close(got_grads[key], expected_grads[key], rtol=1e-4, atol=1e-6, msg=key)


# hybrid-tiny: Mamba-2 + attention, untied head; jamba-tiny: Mamba-1 + attention + MoE (aux losses);
# mamba1-tiny: tied head. 41 positions x 2 rows: no chunk size divides the 82 flattened positions.
@pytest.mark.parametrize("name", ["hybrid-tiny", "jamba-tiny", "mamba1-tiny"])
@pytest.mark.parametrize("chunk_size", [7, 16, 1000])
def test_equals_the_unchunked_loss_and_gradients(name, chunk_size):
    plain, chunked = pair(name, chunk_size)
    if name == "jamba-tiny":
        assert plain(batch(256)[0], labels=batch(256)[1]).aux_losses  # the MoE's losses are in the comparison
    assert_same_loss_and_grads(plain, chunked, *batch(plain.config.vocab_size)[:2])


def test_left_padding_and_a_padded_vocabulary():
    # vocab 250 in a head of 256 rows: the padded rows must not enter the softmax; row 1 left-padded.
    plain, chunked = pair("hybrid-tiny", 9, vocab_size=250)
    assert plain.lm_head.weight.shape[0] == 256
    assert_same_loss_and_grads(plain, chunked, *batch(250, seqlen=23, pad=6))


def test_untied_head_and_autocast():
    plain, chunked = pair("hybrid-tiny", 10)  # untied embeddings
    assert not plain.config.tie_embeddings
    ids, labels, _ = batch(256, seqlen=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(ids, labels=labels).loss
        got = chunked(ids, labels=labels).loss
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    got.backward()
    assert chunked.lm_head.weight.grad is not None and chunked.lm_head.weight.grad.abs().sum() > 0


def test_no_grad_evaluation_gives_the_same_loss():
    plain, chunked = pair("mamba2-tiny", 5)
    ids, labels, _ = batch(256, seqlen=16)
    with torch.no_grad():
        torch.testing.assert_close(chunked(ids, labels=labels).loss, plain(ids, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)


def test_all_labels_ignored_gives_zero_and_a_backward():
    plain, chunked = pair("mamba2-tiny", 4)
    ids = torch.randint(0, 256, (1, 12))
    ignored = torch.full_like(ids, IGNORE_INDEX)
    expected = plain(ids, labels=ignored)
    got = chunked(ids, labels=ignored)
    assert float(got.ce_loss.detach()) == 0.0 == float(expected.ce_loss.detach())
    got.loss.backward()  # as the unchunked loss: a zero on the graph, zero gradients
    expected.loss.backward()
    for (name, p), q in zip(chunked.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad) and not p.grad.any(), name


def test_logits_paths_are_unchanged():
    """Without labels (evaluation, generation) or with a cache, the chunked model returns CausalLM's logits."""
    plain, chunked = pair("hybrid-tiny", 3)
    ids, labels, _ = batch(256, seqlen=12)
    with torch.no_grad():
        torch.testing.assert_close(chunked(ids).logits, plain(ids).logits, rtol=0, atol=0)
        tail = chunked(ids, num_last_tokens=2).logits
        torch.testing.assert_close(tail, plain(ids).logits[:, -2:], rtol=0, atol=0)
        caches = [m.allocate_cache(2, 16) for m in (plain, chunked)]
        expected = plain(ids, cache=caches[0], labels=labels)
        got = chunked(ids, cache=caches[1], labels=labels)  # a prefill that also scores: the logits are kept
        assert got.logits is not None
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    prompts = [[1, 2, 3], [4, 5]]
    outs = [generate(m.eval(), prompts, max_new_tokens=4, temperature=0.0, cuda_graph=False).sequences()
            for m in (plain, chunked)]
    assert outs[0] == outs[1]


def test_never_materializes_the_logits():
    """Through the whole model: the unchunked step builds [B, L, vocab] tensors; the chunked one nothing
    larger than the backbone's own step makes, a chunk's logits or the head's weight."""
    rows, length, vocab, chunk = 2, 128, 4096, 16
    plain, chunked = pair("mamba1-tiny", chunk, vocab_size=vocab)
    ids = torch.randint(0, vocab, (rows, length))
    sizes = []
    for step in (lambda: plain(ids, labels=ids).loss, lambda: chunked(ids, labels=ids).loss,
                 lambda: chunked.backbone(ids)[0].sum()):
        watch = LargestTensor()
        with watch:
            step().backward()
        sizes.append(watch.largest)
    unchunked, chunked_size, backbone = sizes
    bound = max(backbone, chunk * vocab, vocab * chunked.config.d_model)
    assert unchunked >= rows * length * vocab > bound  # the test can tell the two apart
    assert chunked_size <= bound, f"an op made a tensor of {chunked_size} elements (bound {bound})"


def test_chunked_cross_entropy_never_materializes_the_logits():
    torch.manual_seed(0)
    length, d_model, vocab, chunk = 1024, 32, 256, 128
    hidden = torch.randn(1, length, d_model, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, d_model)).requires_grad_()
    labels = torch.randint(0, vocab, (1, length))

    plain = LargestTensor()
    with plain:
        logits = F.linear(hidden, weight).float()
        expected = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), reduction="sum")
        expected.backward()
    assert plain.largest >= length * vocab  # the reference does build [L, V]

    expected_grad = hidden.grad.clone()
    hidden.grad = None
    chunked = LargestTensor()
    with chunked:
        got = chunked_cross_entropy(hidden, weight, labels, vocab, chunk_size=chunk)
        got.backward()
    bound = max(chunk * vocab, length * d_model, vocab * d_model)
    assert chunked.largest <= bound, f"an op made a tensor of {chunked.largest} elements (bound {bound})"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_drops_padded_vocab_rows():
    # The head has 8 rows, the vocabulary 5: the padded rows must not enter the softmax.
    hidden = torch.randn(2, 6, 4)
    weight = torch.randn(8, 4)
    labels = torch.randint(0, 5, (2, 6))
    expected = F.cross_entropy((hidden @ weight.T)[..., :5].reshape(-1, 5), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 5, chunk_size=5), expected)


def test_state_dict_is_the_same():
    """Checkpoints of either mode load into the other: the same keys, shapes and tied aliases."""
    plain, chunked = pair("mamba1-tiny", 8)
    a, b = plain.state_dict(), chunked.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert chunked.lm_head.weight is chunked.backbone.embedding.weight
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in chunked.named_parameters()]


def test_config_field():
    config = get_preset("mamba2-tiny")
    assert config.loss_chunk_size is None
    # Left out of to_dict at its default: the config.json, checkpoints and sweep keys written before
    # the field existed stay the same; from_dict (of those too) fills the default back.
    assert "loss_chunk_size" not in config.to_dict()
    assert ModelConfig.from_dict(config.to_dict()) == config
    chunked = dataclasses.replace(config, loss_chunk_size=4096)
    assert chunked.to_dict()["loss_chunk_size"] == 4096
    assert ModelConfig.from_dict(chunked.to_dict()) == chunked
    assert get_preset("mamba2-tiny", loss_chunk_size=64).loss_chunk_size == 64  # as a preset override
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match=r"loss_chunk_size: must be a positive int .* or None"):
            validate_config(dataclasses.replace(config, loss_chunk_size=bad))


def test_errors_name_the_problem():
    _, chunked = pair("mamba2-tiny", 4)
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        chunked(ids, labels=ids[:, :4])
    hidden, weight = torch.randn(1, 8, 64), torch.randn(256, 64)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        chunked_cross_entropy(hidden, weight, ids, 256, chunk_size=0)
    with pytest.raises(ValueError, match="must match hidden's leading dims"):
        chunked_cross_entropy(hidden, weight, ids[:, :4], 256, chunk_size=4)
    with pytest.raises(ValueError, match=r"weight must be \[padded_vocab >= 300, 64\]"):
        chunked_cross_entropy(hidden, weight, ids, 300, chunk_size=4)
