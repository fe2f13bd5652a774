"""Phonebook retrieval, in synthetic tokens (after the Phonebook task of NVIDIA's "An Empirical Study
of Mamba-based Language Models", Waleffe et al. 2024, sec. 3.3, itself after Jelassi et al. 2024).

A phonebook of ``num_entries`` entries ``name : number ;`` (names of ``name_len`` syllables, distinct
within a book; numbers of ``number_len`` digits) is followed by ``num_queries`` queries ``? name :``,
each answered by that entry's number. The paper found pure Mamba / Mamba-2 models failing as the book
grows while the Mamba-2-Hybrid, with a few attention layers, retrieves as well as a Transformer: a
fixed-size state cannot hold an arbitrary number of (name, number) bindings verbatim.

    ids:    0 ':'  1 ';'  2 '?'  3 .. 12 digits  13 .. 13 + name_vocab - 1 name syllables
    entry:  n_1 .. n_k : d_1 .. d_m ;
    query:  ? n_1 .. n_k : d_1 .. d_m ;      (digits given as input: teacher forcing)
    labels: d_1 at ':', d_{i+1} at d_i, of every query; -100 elsewhere

Scoring every digit under teacher forcing equals greedy decoding's exact match (common.score_model).
"""

from __future__ import annotations

import torch

from core.backbone import IGNORE_INDEX
from domains.lm.tasks.common import TaskBatch, check_positive, randint, random_subsets

_PERMUTE_BELOW = 1 << 14  # populations up to this size are permuted; larger ones are rejection-sampled

SEP, END, QUERY, FIRST_DIGIT, FIRST_NAME = 0, 1, 2, 3, 13


def vocab_size(num_entries: int = 16, num_queries: int = 1, name_len: int = 2, number_len: int = 3,
               name_vocab: int = 64) -> int:
    return FIRST_NAME + name_vocab


def describe(num_entries: int = 16, num_queries: int = 1, name_len: int = 2, number_len: int = 3,
             name_vocab: int = 64) -> str:
    return f"entries={num_entries} queries={num_queries}"


def generate(batch_size: int, generator: torch.Generator, num_entries: int = 16, num_queries: int = 1,
             name_len: int = 2, number_len: int = 3, name_vocab: int = 64) -> TaskBatch:
    """A batch of [B, (num_entries + num_queries) * (name_len + number_len + 2) + ...] sequences:
    the book, then the queries (see the module docstring)."""
    for name, value in (("batch_size", batch_size), ("num_entries", num_entries), ("num_queries", num_queries),
                        ("name_len", name_len), ("number_len", number_len), ("name_vocab", name_vocab)):
        check_positive(name, value)
    names_possible = name_vocab ** name_len
    if num_entries > names_possible:
        raise ValueError(f"{num_entries} distinct names need name_vocab ** name_len >= {num_entries}, have "
                         f"{names_possible}; raise name_vocab or name_len")
    if num_queries > num_entries:
        raise ValueError(f"num_queries={num_queries} > num_entries={num_entries}: each query asks a distinct entry")
    B, E, Q = batch_size, num_entries, num_queries
    rows = torch.arange(B)[:, None]
    code = distinct_codes(generator, B, names_possible, E)  # distinct names as base-name_vocab numbers
    syllables = torch.stack([(code // name_vocab ** i) % name_vocab for i in range(name_len)], dim=2)
    names = FIRST_NAME + syllables                                           # [B, E, name_len]
    numbers = randint(generator, FIRST_DIGIT, FIRST_DIGIT + 10, (B, E, number_len))
    sep = torch.full((B, E, 1), SEP, dtype=torch.long)
    end = torch.full((B, E, 1), END, dtype=torch.long)
    book = torch.cat([names, sep, numbers, end], dim=2).reshape(B, -1)

    asked = random_subsets(generator, B, E, Q)                               # [B, Q]
    q_names, q_numbers = names[rows, asked], numbers[rows, asked]
    q_mark = torch.full((B, Q, 1), QUERY, dtype=torch.long)
    queries = torch.cat([q_mark, q_names, sep[:, :Q], q_numbers, end[:, :Q]], dim=2)  # [B, Q, k + m + 3]
    q_labels = torch.full_like(queries, IGNORE_INDEX)
    colon = 1 + name_len
    q_labels[:, :, colon:colon + number_len] = q_numbers                   # ':' -> d_1, d_i -> d_{i+1}
    input_ids = torch.cat([book, queries.reshape(B, -1)], dim=1)
    labels = torch.cat([torch.full_like(book, IGNORE_INDEX), q_labels.reshape(B, -1)], dim=1)
    return TaskBatch(input_ids, labels)


def distinct_codes(generator: torch.Generator, rows: int, population: int, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row k distinct values of range(population), uniformly.

    Small populations are permuted; large ones are drawn with replacement and the rows that came out
    with a repeat are drawn again (rare when k^2 << population), which keeps memory at [rows, k].
    """
    if population <= _PERMUTE_BELOW:
        return random_subsets(generator, rows, population, k)
    codes = randint(generator, 0, population, (rows, k))
    while True:
        ordered = codes.sort(dim=1).values
        bad = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().flatten()
        if bad.numel() == 0:
            return codes
        codes[bad] = randint(generator, 0, population, (bad.numel(), k))
