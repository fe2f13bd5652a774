"""Selective copying (Mamba paper, Gu & Dao 2023, sec. 4.1.1 and Fig. 2).

``num_tokens`` data tokens sit at random positions of a context of ``seq_len`` tokens, the rest noise;
``num_tokens`` copy markers follow, and at the i-th marker the model must output the i-th data token.
The spacing is random, so a time-invariant model (a fixed convolution, LTI SSM, Hyena's implicit long
filter) cannot solve it by a fixed shift; a selective SSM can, by ignoring the noise.

    ids:    0 = noise, 1 = copy marker, 2 .. vocab + 1 = data tokens   (vocab_size = vocab + 2)
    input:  [context (seq_len): noise with the data tokens in order] [marker x num_tokens]
    labels: -100 on the context, the data tokens on the markers

The paper's setting is seq_len 4096, num_tokens 16, vocab 16 (``task=selective_copying-gpu``).
"""

from __future__ import annotations

import torch

from core.backbone import IGNORE_INDEX
from domains.lm.tasks.common import TaskBatch, check_positive, randint, random_subsets

NOISE, MARKER, FIRST_DATA = 0, 1, 2


def vocab_size(seq_len: int = 4096, num_tokens: int = 16, vocab: int = 16) -> int:
    return vocab + FIRST_DATA


def describe(seq_len: int = 4096, num_tokens: int = 16, vocab: int = 16) -> str:
    return f"L={seq_len} tokens={num_tokens}"


def generate(batch_size: int, generator: torch.Generator, seq_len: int = 4096, num_tokens: int = 16,
             vocab: int = 16) -> TaskBatch:
    """A batch of [B, seq_len + num_tokens] sequences (see the module docstring)."""
    check_positive("batch_size", batch_size)
    check_positive("num_tokens", num_tokens)
    check_positive("vocab", vocab)
    if check_positive("seq_len", seq_len) < num_tokens:
        raise ValueError(f"seq_len={seq_len} cannot hold num_tokens={num_tokens} data tokens; "
                         "use seq_len >= num_tokens")
    positions = random_subsets(generator, batch_size, seq_len, num_tokens).sort(dim=1).values
    data = randint(generator, FIRST_DATA, FIRST_DATA + vocab, (batch_size, num_tokens))
    context = torch.full((batch_size, seq_len), NOISE, dtype=torch.long).scatter_(1, positions, data)
    input_ids = torch.cat([context, torch.full((batch_size, num_tokens), MARKER, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long), data], dim=1)
    return TaskBatch(input_ids, labels)
