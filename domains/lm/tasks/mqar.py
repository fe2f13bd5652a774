"""Multi-query associative recall, MQAR (Zoology: Arora et al. 2023, sec. 3 and App. E).

The sequence opens with ``num_kv`` key-value pairs (keys distinct, drawn from the lower half of the
vocabulary, values from the upper half); then, in the rest of the sequence, every key is queried once,
at positions whose distance from the context follows Zoology's power law (``power_a``: smaller means
queries bunch closer to the pairs). At a query, the model must output that key's value. Zoology shows
gated convolutions and pure SSMs losing accuracy as the number of pairs grows at fixed model width, while
attention keeps recalling.

    ids:    0 = blank, 1 .. vocab/2 - 1 = keys, vocab/2 .. vocab - 1 = values  (vocab_size = vocab)
    input:  [k_1 v_1 ... k_n v_n] [blanks, with query k at offset 2j of the query region, blank after]
    labels: the queried key's value at each query position, -100 elsewhere

Zoology's setting: vocab 8192, (seq_len, num_kv) from (64, 4) to (512, 64) (``task=mqar-gpu``).
"""

from __future__ import annotations

import torch

from core.backbone import IGNORE_INDEX
from domains.lm.tasks.common import TaskBatch, check_positive, randint, random_subsets

BLANK = 0


def vocab_size(seq_len: int = 64, num_kv: int = 4, vocab: int = 8192, power_a: float = 0.01) -> int:
    return vocab


def describe(seq_len: int = 64, num_kv: int = 4, vocab: int = 8192, power_a: float = 0.01) -> str:
    return f"L={seq_len} pairs={num_kv}"


def generate(batch_size: int, generator: torch.Generator, seq_len: int = 64, num_kv: int = 4,
             vocab: int = 8192, power_a: float = 0.01) -> TaskBatch:
    """A batch of [B, seq_len] sequences (see the module docstring)."""
    check_positive("batch_size", batch_size)
    check_positive("num_kv", num_kv)
    check_positive("vocab", vocab, minimum=4)
    key_vocab = vocab // 2
    if num_kv > key_vocab - 1:
        raise ValueError(f"num_kv={num_kv} distinct keys do not fit in {key_vocab - 1} key ids; raise vocab")
    if check_positive("seq_len", seq_len) < 4 * num_kv:
        raise ValueError(f"seq_len={seq_len} is too short for num_kv={num_kv}: the pairs take 2 * num_kv "
                         f"tokens and the queries as many again; use seq_len >= {4 * num_kv}")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rows = torch.arange(batch_size)[:, None]
    keys = random_subsets(generator, batch_size, key_vocab - 1, num_kv) + 1
    values = randint(generator, key_vocab, vocab, (batch_size, num_kv))
    context = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * num_kv)

    # Query slots are the even offsets of the query region; Zoology's power law p(j) ~ a * j^(a - 1)
    # over the slot index j = 1 .. S (heavier near the pairs), sampled without replacement.
    region = seq_len - 2 * num_kv
    slots = region // 2
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    chosen = torch.multinomial(weights.expand(batch_size, slots), num_kv, replacement=False, generator=generator)
    order = random_subsets(generator, batch_size, num_kv, num_kv)  # which key each chosen slot asks for
    queries = torch.full((batch_size, region), BLANK, dtype=torch.long)
    query_labels = torch.full((batch_size, region), IGNORE_INDEX, dtype=torch.long)
    queries[rows, 2 * chosen] = keys[rows, order]
    query_labels[rows, 2 * chosen] = values[rows, order]
    input_ids = torch.cat([context, queries], dim=1)
    labels = torch.cat([torch.full_like(context, IGNORE_INDEX), query_labels], dim=1)
    return TaskBatch(input_ids, labels)
