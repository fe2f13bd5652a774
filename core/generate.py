"""Autoregressive generation with the inference cache: chunked prefill, then one token a step.

Works for every model that keeps the ``CausalLM`` contract (``forward(input_ids, cache, padding_mask)``
and ``allocate_cache``), whatever its mixers: Mamba layers carry a recurrent state, attention a KV
cache, Hyena its input history.

Prompts of unequal length are left-padded into one batch; the padding mask makes every mixer ignore
the pads, so each prompt's continuation equals the one it gets alone (a test checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    tokens:        int64 [B, max_new_tokens]: the new tokens, ``pad_token_id`` after a sequence stopped.
    lengths:       int64 [B]: how many new tokens each sequence produced (a stop token included).
    prompt_tokens: total prompt tokens processed by the prefill.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_tokens: int

    def sequences(self) -> list[list[int]]:
        """The new tokens of each sequence as Python lists, without the padding after a stop."""
        return [row[: int(n)].tolist() for row, n in zip(self.tokens, self.lengths)]


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, V] (float); returns int64 [B].

    ``temperature == 0`` is greedy. ``top_k > 0`` keeps the k most likely tokens; ``top_p < 1`` keeps
    the smallest set whose probability reaches p (always at least the most likely token).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]] | torch.Tensor, pad_token_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch prompts by left padding: ids int64 [B, P] and padding mask bool [B, P] (None if all equal)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be [B, L] token ids, got shape {tuple(prompts.shape)}")
        if prompts.shape[1] == 0:
            raise ValueError("prompts are empty: give at least one token per prompt (e.g. a BOS token)")
        return prompts.to(device=device, dtype=torch.long), None
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("a prompt is empty: give at least one token per prompt (e.g. a BOS token)")
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = True
    ids = ids.to(device)
    return ids, (None if min(lengths) == width else mask.to(device))


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token_id: int = 0,
    prefill_chunk_size: int | None = None,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompts: a list of token-id lists (any lengths) or an int tensor [B, L].
    prefill_chunk_size: feed the prompt in chunks of this many tokens (bounds prefill memory for long
        prompts); None feeds it at once.
    on_token: called after every step with (step, new tokens int64 [B]) for streaming output.
    A sequence stops after emitting any of ``stop_tokens``; generation ends when all have stopped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids, padding_mask = left_pad(prompts, pad_token_id, device)
    batch, prompt_len = ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = model.allocate_cache(batch, prompt_len + max_new_tokens, device=device)
        chunk = prompt_len if not prefill_chunk_size else prefill_chunk_size
        for start in range(0, prompt_len, chunk):
            part_mask = None if padding_mask is None else padding_mask[:, start:start + chunk]
            logits = model(ids[:, start:start + chunk], cache=cache, padding_mask=part_mask, num_last_tokens=1).logits
        next_logits = logits[:, -1]

        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            sampled = sample_next_token(next_logits, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(sampled, pad_token_id), sampled)
            tokens[:, step] = token
            lengths += (~finished).long()
            if on_token is not None:
                on_token(step, token)
            if stop.numel():
                finished |= torch.isin(token, stop)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            # A finished row keeps decoding its own sample (a valid id; pad_token_id may not be one),
            # and its outputs are discarded.
            next_logits = model(sampled[:, None], cache=cache, num_last_tokens=1).logits[:, -1]
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, lengths=lengths, prompt_tokens=int(batch * prompt_len))
