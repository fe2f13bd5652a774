"""The LM head and its cross-entropy over chunks of positions: long sequences never hold all their logits.

At 128K tokens and the GPT-NeoX vocabulary (50,288 rows), one sequence's logits are
[131072, 50288] float32 = 26 GB, and ``F.cross_entropy`` keeps a log-softmax of the same size for its
backward, with the bf16 copy and the gradient on top: more than everything else a 130M model needs to
train at that length with per-block activation checkpointing. :func:`chunked_cross_entropy` runs the
head and the loss ``chunk_size`` positions at a time, each chunk under PyTorch's non-reentrant
activation checkpoint:

    hidden = backbone(input_ids)                      [B, L, d_model]   (kept, as without chunking)
    for each chunk c of positions (of the flattened B * L):
        loss_sum += CE(lm_head(hidden[c]), labels[c])  only hidden[c] (a view) and labels[c] are saved
    backward: chunk by chunk, recompute lm_head(hidden[c]) and the log-softmax, then their gradients

so at any time at most one chunk's logits exist (peak about 4 x chunk_size x vocab x 4 bytes: the
float32 logits, log-softmax and their gradients, plus a bf16 copy), and nothing of size L x vocab is
ever allocated. This is the memory a "sequence parallel" split would save, on one device and without
communication.

Cost: the head's forward matmul runs once more per chunk in the backward, +1/3 of the head's training
FLOPs (``2 d_model vocab`` per token, about +10% of a 130M model's step at 2K tokens, less at long
lengths where the mixers dominate). A fused kernel that writes the gradients during the forward
(Liger's fused linear cross-entropy) avoids the recompute; this module keeps to PyTorch ops.

Who calls it: :meth:`core.backbone.CausalLM.forward`, when the model's config sets
``loss_chunk_size`` (``ModelConfig.loss_chunk_size``; ``lm train loss_chunk_size=<n>`` sets it) and the
call has labels and no cache. The head is applied as CausalLM applies it (the hidden states cast to the
head's dtype, the matmul under autocast too since the checkpoint replays the autocast state, the padded
vocabulary rows dropped, a float32 log-softmax), so the loss and its gradients equal the unchunked
ones. Chunks whose labels are all ignored are skipped.

This module imports only torch (``core.backbone`` imports it, and re-exports :data:`IGNORE_INDEX`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels the LM loss skips (prompt positions, padding)


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed cross-entropy of one chunk: hidden [n, d] (any float dtype), labels [n] -> float32 scalar.

    The head as ``CausalLM.forward`` applies it: the hidden states cast to the head's dtype, the padded
    vocabulary rows dropped, the logits in float32.
    """
    logits = F.linear(hidden.to(weight.dtype), weight)[:, :vocab_size].float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                          chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of the LM head over chunks, never materializing all the logits.

    hidden:     [..., d_model] (the backbone's normalized output; float32 or the model dtype).
    weight:     the head's weight [padded_vocab, d_model].
    labels:     int64 [...] matching hidden's leading dims; -100 (:data:`IGNORE_INDEX`) is ignored.
    vocab_size: the real vocabulary (padded rows beyond it are dropped, as CausalLM does).
    chunk_size: positions per chunk (over the flattened leading dims), >= 1.

    Returns the float32 scalar sum over labels != -100 (divide by their count for the mean). With
    gradients enabled, every chunk is checkpointed: its logits are recomputed in the backward. One
    device sync per call (which chunks have a label at all).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (positions per chunk), got {chunk_size!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < vocab_size:
        raise ValueError(f"weight must be [padded_vocab >= {vocab_size}, {hidden.shape[-1]}], "
                         f"got {tuple(weight.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    n = flat_labels.shape[0]
    # Which chunks have a label at all, with one device sync for the whole sequence.
    chunk_of = torch.arange(n, device=flat_labels.device) // chunk_size
    counts = torch.zeros(-(-n // chunk_size), device=flat_labels.device, dtype=torch.int64)
    counts.index_add_(0, chunk_of, (flat_labels != IGNORE_INDEX).long())
    # A zero on the autograd graph: a batch without a single label still gives a loss whose backward
    # runs (zero gradients), as the unchunked cross-entropy does.
    total = flat_hidden[:0].sum(dtype=torch.float32) + weight[:0].sum(dtype=torch.float32)
    for index, count in enumerate(counts.tolist()):
        if count == 0:
            continue  # contributes nothing, value or gradient
        start = index * chunk_size
        chunk_labels = flat_labels[start:start + chunk_size]
        chunk_hidden = flat_hidden[start:start + chunk_size]
        if keep_graph:
            part = checkpoint(_chunk_loss_sum, chunk_hidden, chunk_labels, weight, vocab_size, use_reentrant=False)
        else:
            part = _chunk_loss_sum(chunk_hidden, chunk_labels, weight, vocab_size)
        total = total + part
    return total
