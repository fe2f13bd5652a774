"""Autoregressive generation with the inference cache: chunked prefill, then one token a step.

Works for every model that keeps the ``CausalLM`` contract (``forward(input_ids, cache, padding_mask)``
and ``allocate_cache``), whatever its mixers: Mamba layers carry a recurrent state, attention a KV
cache, Hyena its input history.

Prompts of unequal length are left-padded into one batch; the padding mask makes every mixer ignore
the pads, so each prompt's continuation equals the one it gets alone (a test checks this).

The prefill runs the model's forward (the chunked scan kernels, flash attention), in chunks of
``prefill_chunk_size`` tokens if asked; with the graph decoder, a prompt batch of a length seen before
(unpadded, small: ``CUDAGraphRunner.prefill``) replays a captured forward instead. The decoding steps
run :func:`core.cuda_graph.decode_step`, captured in a CUDA graph on GPU (``cuda_graph="auto"``, see
``core/cuda_graph.py``) or launched eagerly; both run the same kernels and give the same tokens. The
loop never waits for the GPU except to check, every ``stop_check_interval`` steps, whether every sequence
has stopped; the tokens a row samples after its stop token are replaced by ``pad_token_id`` at the end,
so the output does not depend on the interval.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.backbone import CausalLM
from core.cache import ssm_state_dtype_for
from core.cuda_graph import (
    CUDAGraphDecoder,
    allocate_decode_cache,
    bucketed_cache_length,
    decode_step,
    graph_decoder,
    graph_unsafe_reason,
)


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    tokens:        int64 [B, max_new_tokens]: the new tokens, ``pad_token_id`` after a sequence stopped.
    lengths:       int64 [B]: how many new tokens each sequence produced (a stop token included).
    prompt_tokens: total prompt tokens processed by the prefill.
    cuda_graph:    whether the decoding steps were replayed from a CUDA graph.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_tokens: int
    cuda_graph: bool = False

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


class StreamingDetokenizer:
    """Text of a growing token sequence, piece by piece, for streaming output.

    Decoding token by token breaks characters that a byte-level BPE splits over several tokens, and
    decoding the whole sequence every step costs O(n) per token. This keeps two offsets (as HF's and
    vLLM's incremental detokenizers): it decodes only a short window, from the start of the last emitted
    piece, and emits the new text once it no longer ends in an incomplete character (U+FFFD).

    decode: token ids -> text (e.g. ``tokenizer.decode``). ``push(token)`` returns the new text (maybe
    ""); ``flush()`` returns what is still held back at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = 0  # window start: the first token of the last emitted piece
        self.read = 0  # tokens up to here are emitted

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(before):]


def _decoder_for(model: nn.Module, cuda_graph: bool | str | CUDAGraphDecoder,
                 device: torch.device) -> CUDAGraphDecoder | None:
    """The graph decoder that ``cuda_graph`` asks for, or None for eager steps."""
    if isinstance(cuda_graph, CUDAGraphDecoder):
        if cuda_graph.model is not model:
            raise ValueError("the CUDAGraphDecoder passed as cuda_graph belongs to another model")
        return cuda_graph
    if cuda_graph is False:
        return None
    if cuda_graph == "auto":
        return graph_decoder(model) if device.type == "cuda" and graph_unsafe_reason(model) is None else None
    if cuda_graph is True:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}; "
                             "use cuda_graph='auto' (graphs on CUDA only) or False")
        reason = graph_unsafe_reason(model)
        if reason is not None:
            raise ValueError(f"cuda_graph=True: {reason}")
        return graph_decoder(model)
    raise ValueError(f"cuda_graph must be True, False, 'auto' or a CUDAGraphDecoder, got {cuda_graph!r}")


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
    cuda_graph: bool | str | CUDAGraphDecoder = "auto",
    stop_check_interval: int | None = None,
    ssm_state_dtype: torch.dtype | None = None,
) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompts: a list of token-id lists (any lengths) or an int tensor [B, L].
    prefill_chunk_size: feed the prompt in chunks of this many tokens (bounds prefill memory for long
        prompts); None feeds it at once.
    on_token: called after every step with (step, new tokens int64 [B]) for streaming output (the tokens
        are ``pad_token_id`` for rows that already stopped).
    cuda_graph: ``"auto"`` replays the decoding step from a CUDA graph when the model is on CUDA and
        every block supports it (eager steps otherwise); True requires it; False never; a
        :class:`~core.cuda_graph.CUDAGraphDecoder` of this model uses that decoder (with
        ``capture=False`` it runs the graph code path eagerly). Tokens are the same either way.
    stop_check_interval: with stop tokens, check every this many steps whether all rows stopped (each
        check waits for the GPU); default 1 on CPU, 8 on CUDA. The output does not depend on it.
    ssm_state_dtype: the Mamba layers' recurrent state during generation: None (float32), or bfloat16 /
        float16, updated in float32 and rounded once a token as mamba_ssm keeps it (half the state's
        memory and traffic; the tokens may then differ from float32's where two logits nearly tie).
    A sequence stops after emitting any of ``stop_tokens``; generation ends when all have stopped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_check_interval is not None and stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be >= 1, got {stop_check_interval}")
    if ssm_state_dtype is not None:
        ssm_state_dtype_for(torch.float32, ssm_state_dtype)  # names the allowed dtypes
        if "ssm_state_dtype" not in inspect.signature(model.allocate_cache).parameters:
            raise ValueError(f"ssm_state_dtype: {type(model).__name__}.allocate_cache takes no ssm_state_dtype; "
                             "leave it None (float32 states)")
    device = next(model.parameters()).device
    ids, padding_mask = left_pad(prompts, pad_token_id, device)
    batch, prompt_len = ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    interval = stop_check_interval or (8 if device.type == "cuda" else 1)
    decoder = _decoder_for(model, cuda_graph, device)

    was_training = model.training
    model.eval()
    try:
        max_seqlen = prompt_len + max_new_tokens
        captured = False
        if decoder is not None:
            runner = decoder.runner(batch, max_seqlen, ssm_state_dtype)
            cache, step_fn, captured = runner.cache, runner.step, runner.captured
        else:
            # The graph decoder's cache length, so that eager and graph steps add in the same order.
            length = bucketed_cache_length(model, batch, max_seqlen)[0] if isinstance(model, CausalLM) else max_seqlen
            cache = allocate_decode_cache(model, batch, length, device, ssm_state_dtype)

            def step_fn(token: torch.Tensor) -> torch.Tensor:
                return decode_step(model, token, cache)

        chunk = prompt_len if not prefill_chunk_size else prefill_chunk_size
        if decoder is not None and padding_mask is None and chunk >= prompt_len:
            next_logits = runner.prefill(ids)  # replayed from a graph for a prompt length seen before
        else:
            for start in range(0, prompt_len, chunk):
                part_mask = None if padding_mask is None else padding_mask[:, start:start + chunk]
                logits = model(ids[:, start:start + chunk], cache=cache, padding_mask=part_mask,
                               num_last_tokens=1).logits
            next_logits = logits[:, -1]

        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        samples = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = 0
        # Greedy through a graph runner: each step picks its argmax inside the graph and feeds it to the next.
        greedy_runner = decoder is not None and (temperature == 0 or top_k == 1)
        for step in range(max_new_tokens):
            if greedy_runner and step > 0:
                samples[:, step] = runner.greedy_token  # = the argmax of next_logits
                sampled = samples[:, step]
            else:
                sampled = sample_next_token(next_logits, temperature, top_k, top_p, generator)
                samples[:, step] = sampled
            steps = step + 1
            if on_token is not None:
                on_token(step, torch.where(finished, torch.full_like(sampled, pad_token_id), sampled))
            if stop.numel():
                finished |= torch.isin(sampled, stop)
                if steps % interval == 0 and bool(finished.all()):  # the loop's only host sync
                    break
            if steps == max_new_tokens:
                break
            # A finished row keeps decoding its own sample (a valid id; pad_token_id may not be one);
            # what it samples is replaced by pads below.
            next_logits = step_fn(None if greedy_runner and step > 0 else sampled)
    finally:
        model.train(was_training)

    tokens = samples
    lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    if stop.numel():
        is_stop = torch.isin(samples[:, :steps], stop).long()
        after_stop = (is_stop.cumsum(dim=-1) - is_stop) > 0  # strictly after the row's first stop token
        tokens[:, :steps] = samples[:, :steps].masked_fill(after_stop, pad_token_id)
        lengths -= after_stop.sum(dim=-1)
    return GenerationOutput(tokens=tokens, lengths=lengths, prompt_tokens=int(batch * prompt_len),
                            cuda_graph=captured)
