"""Induction heads (Mamba paper, Gu & Dao 2023, sec. 4.1.2 and Table 2; Olsson et al. 2022).

A random sequence over ``vocab - 1`` ordinary tokens holds the trigger token once at a random place,
followed by some token x; the sequence ends with the trigger again, and the model must output x. The
interesting number is accuracy at lengths far beyond the training length: the Mamba paper trains at
256 and tests up to 2^20, where Mamba stays perfect and attention with RoPE falls to chance past about
twice the training length.

    ids:    0 = trigger, 1 .. vocab - 1 = ordinary tokens          (vocab_size = vocab)
    input:  [t_0 ... t_{p-1}, TRIGGER, x, t_{p+2} ... t_{L-2}, TRIGGER]   p uniform in [0, L - 3]
    labels: x at the last position, -100 elsewhere

Chance is 1 / (vocab - 1).
"""

from __future__ import annotations

import torch

from core.backbone import IGNORE_INDEX
from domains.lm.tasks.common import TaskBatch, check_positive, randint

TRIGGER = 0


def vocab_size(seq_len: int = 256, vocab: int = 16) -> int:
    return vocab


def describe(seq_len: int = 256, vocab: int = 16) -> str:
    return f"L={seq_len}"


def generate(batch_size: int, generator: torch.Generator, seq_len: int = 256, vocab: int = 16) -> TaskBatch:
    """A batch of [B, seq_len] sequences (see the module docstring)."""
    check_positive("batch_size", batch_size)
    check_positive("vocab", vocab, minimum=3)
    check_positive("seq_len", seq_len, minimum=3)
    ids = randint(generator, TRIGGER + 1, vocab, (batch_size, seq_len))
    rows = torch.arange(batch_size)
    place = randint(generator, 0, seq_len - 2, (batch_size,))  # the trigger; x at place + 1 <= L - 2
    ids[rows, place] = TRIGGER
    answer = ids[rows, place + 1]
    ids[:, -1] = TRIGGER
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = answer
    return TaskBatch(ids, labels)
