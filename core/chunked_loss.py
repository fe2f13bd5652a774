"""The LM head and its cross-entropy over chunks of positions: long sequences never hold all their logits.

At 128K tokens and the GPT-NeoX vocabulary (50,288 rows), one sequence's logits are
[131072, 50288] float32 = 26 GB, and ``F.cross_entropy`` keeps a log-softmax of the same size for its
backward, with the bf16 copy and the gradient on top: more than everything else a 130M model needs to
train at that length with per-block activation checkpointing. :func:`chunked_lm_loss` runs the head
and the loss ``chunk_size`` positions at a time, each chunk under PyTorch's non-reentrant activation
checkpoint:

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

The result is CausalLM's: the same matmul in the head's dtype (under autocast too, since the checkpoint
replays the autocast state), the same float32 log-softmax, the mean over labels != -100, plus the
MoE auxiliary losses. Chunks whose labels are all ignored are skipped.

Training code that calls ``model(input_ids, labels=labels)`` (``core.training.CausalLMModule``) gets the
chunked loss from :class:`ChunkedLossLM`, a CausalLM whose loss forward is this one: ``lm train`` swaps it
in with ``loss_chunk_size=<n>`` (same modules, parameter names and checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.backbone import IGNORE_INDEX, CausalLM, CausalLMOutput
from core.cache import InferenceCache

DEFAULT_CHUNK_SIZE = 4096


@dataclass
class LMLoss:
    """What :func:`lm_loss` returns: the fields of ``CausalLMOutput`` that training reads.

    loss:       scalar float32, ``ce_loss + sum(aux_losses.values())``.
    ce_loss:    scalar float32, the mean cross-entropy over labels != -100 (0 when every label is ignored).
    aux_losses: the MoE layers' weighted auxiliary losses (empty without MoE).
    tokens:     how many labels counted (!= -100).
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed cross-entropy of one chunk: hidden [n, d] (any float dtype), labels [n] -> float32 scalar.

    The head as ``CausalLM.forward`` applies it: the hidden states cast to the head's dtype, the padded
    vocabulary rows dropped, the logits in float32.
    """
    logits = F.linear(hidden.to(weight.dtype), weight)[:, :vocab_size].float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed cross-entropy of the LM head over chunks, never materializing all the logits.

    hidden:     [..., d_model] (the backbone's normalized output; float32 or the model dtype).
    weight:     the head's weight [padded_vocab, d_model].
    labels:     int64 [...] matching hidden's leading dims; -100 is ignored.
    vocab_size: the real vocabulary (padded rows beyond it are dropped, as CausalLM does).
    chunk_size: positions per chunk (over the flattened leading dims).

    Returns the float32 scalar sum over labels != -100 (divide by their count for the mean). With
    gradients enabled, every chunk is checkpointed: its logits are recomputed in the backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
    total = flat_hidden.new_zeros((), dtype=torch.float32)
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


def _check_model(model: nn.Module) -> None:
    for name in ("backbone", "lm_head", "config"):
        if not hasattr(model, name):
            raise TypeError(f"chunked_lm_loss needs a core.backbone.CausalLM (backbone + lm_head + config), got "
                            f"{type(model).__name__} without .{name}")


def chunked_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, padding_mask: torch.Tensor | None = None) -> LMLoss:
    """``model(input_ids, labels=labels)``'s loss, with the head and the cross-entropy over chunks.

    model: a :class:`~core.backbone.CausalLM`; input_ids, labels int64 [B, L] (labels[:, t] is the
    target at position t, -100 ignored); padding_mask as CausalLM's. Equal to the unchunked loss (and
    so are the gradients), without ever holding [B, L, vocab] logits.
    """
    _check_model(model)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)} (labels[:, t] is the target "
                         f"at position t), got {tuple(labels.shape)}")
    hidden, aux_losses = model.backbone(input_ids, padding_mask=padding_mask)
    loss_sum = chunked_cross_entropy(hidden, model.lm_head.weight, labels, model.config.vocab_size, chunk_size)
    tokens = int((labels != IGNORE_INDEX).sum())
    ce_loss = loss_sum / max(tokens, 1)
    loss = ce_loss + sum(aux_losses.values()) if aux_losses else ce_loss
    return LMLoss(loss=loss, ce_loss=ce_loss, aux_losses=aux_losses, tokens=tokens)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int = 0) -> LMLoss:
    """The training loss of a causal LM: ``chunk_size`` 0 runs ``model(input_ids, labels=labels)`` (all
    logits at once), > 0 :func:`chunked_lm_loss` with that many positions a chunk."""
    if chunk_size < 0:
        raise ValueError(f"loss chunk_size must be >= 0 (0: no chunking), got {chunk_size}")
    if chunk_size:
        return chunked_lm_loss(model, input_ids, labels, chunk_size)
    out = model(input_ids, labels=labels)
    return LMLoss(loss=out.loss, ce_loss=out.ce_loss, aux_losses=out.aux_losses,
                  tokens=int((labels != IGNORE_INDEX).sum()))


class ChunkedLossLM(CausalLM):
    """A :class:`~core.backbone.CausalLM` whose loss forward runs the head and the cross-entropy over
    chunks of ``loss_chunk_size`` positions (:func:`chunked_lm_loss`).

    ``forward(input_ids, labels=labels)`` (no cache) returns a ``CausalLMOutput`` with ``loss``,
    ``ce_loss`` and ``aux_losses`` equal to CausalLM's and ``logits=None``: they are never materialized,
    which is the point. Every other call (no labels, a cache, generation) is CausalLM's. The modules,
    parameter names and state dict are CausalLM's, so checkpoints and exports are interchangeable.
    """

    def __init__(self, config, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 loss_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.loss_chunk_size = _check_chunk(loss_chunk_size)

    @classmethod
    def from_model(cls, model: CausalLM, loss_chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedLossLM:
        """A ChunkedLossLM over ``model``'s modules (shared, not copied: the weights are the same tensors)."""
        if not isinstance(model, CausalLM):
            raise TypeError(f"ChunkedLossLM.from_model needs a core.backbone.CausalLM, got {type(model).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.config = model.config
        new.backbone = model.backbone
        new.lm_head = model.lm_head
        new.loss_chunk_size = _check_chunk(loss_chunk_size)
        # CausalLM's direct members are exactly these; if it ever gains another, this must copy it too.
        for what in ("_modules", "_parameters", "_buffers"):
            if getattr(new, what).keys() != getattr(model, what).keys():
                raise RuntimeError(f"ChunkedLossLM.from_model: CausalLM has {what} {sorted(getattr(model, what))}, "
                                   f"the wrapper {sorted(getattr(new, what))}; update from_model")
        return new.train(model.training)

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_last_tokens: int = 0) -> CausalLMOutput:
        if labels is None or cache is not None:
            return super().forward(input_ids, cache=cache, padding_mask=padding_mask, labels=labels,
                                   num_last_tokens=num_last_tokens)
        self._check_inputs(input_ids, cache, padding_mask, labels, num_last_tokens)
        out = chunked_lm_loss(self, input_ids, labels, self.loss_chunk_size, padding_mask)
        return CausalLMOutput(logits=None, loss=out.loss, ce_loss=out.ce_loss,  # type: ignore[arg-type]
                              aux_losses=out.aux_losses)

    def extra_repr(self) -> str:
        return f"loss_chunk_size={self.loss_chunk_size}"


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be an int >= 1 (positions per chunk), got {chunk_size!r}")
    return chunk_size
