"""DNA tokenizers: one token a base (HyenaDNA's character tokenizer) or one token per k bases.

Ids (both kinds): the specials first, then the bases or k-mers:

    0 <pad>   1 <bos>   2 <eos>   3 <cls>   4 <mask>
    k = 1:    5 A   6 C   7 G   8 T   9 N                              vocab 10
    k > 1:    5 .. 5 + 4^k - 1 the k-mers over ACGT in lexicographic order (AA..A first), then one
              token for every k-mer holding an N                          vocab 5 + 4^k + 1

Differences from HyenaDNA's ``CharacterTokenizer``, and why: letters outside the DNA alphabet are an
error when the genome is read (:mod:`domains.dna.genome`), never a silent ``[UNK]``; soft-masking
(lowercase) is not folded into the ids but kept as a separate mask, since repeat-masking conventions
differ between assemblies (in the apes alignment the gorilla rows are uppercase where the others are
lowercase: a classifier seeing case would learn the assembly, not the species).

Non-overlapping k-mers (stride k) keep the sequence length L / k; the reverse complement of a
tokenized window is ``rc_map[ids].flip(-1)`` for every k (each k-mer maps to its reverse complement),
which is what the RC-equivariant models and RC augmentation use. Bits per base divide the loss per
token by k.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import product
from typing import Any

import numpy as np
import torch

from domains.dna.genome import BASE_MASK, N_CODE

SPECIALS = ("<pad>", "<bos>", "<eos>", "<cls>", "<mask>")
PAD, BOS, EOS, CLS, MASK = range(len(SPECIALS))
MAX_K = 8


class TokenizerMismatchError(ValueError):
    """A checkpoint trained with another tokenizer than the one asked for."""


class DNATokenizer:
    """Base codes (uint8, :mod:`domains.dna.genome`) <-> token ids (int64)."""

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"tokenizer.k must be an int in 1..{MAX_K} (1: one token a base), got {k!r}")
        self.k = k
        self.first = len(SPECIALS)
        if k == 1:
            self.tokens = list(SPECIALS) + list("ACGTN")
        else:
            self.tokens = list(SPECIALS) + ["".join(p) for p in product("ACGT", repeat=k)] + ["N" * k]
        self.n_token = len(self.tokens) - 1  # the id of N (k = 1) or of any k-mer with an N
        self.vocab_size = len(self.tokens)
        self._powers = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)

    # ---------------------------------------------------------------------------------------------
    def encode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 base codes [L] (L a multiple of k) -> int64 ids [L / k]."""
        base = np.asarray(codes, dtype=np.uint8) & BASE_MASK
        if self.k == 1:
            return base.astype(np.int64) + self.first
        if base.size % self.k:
            raise ValueError(f"a window of {base.size} bases is not a whole number of {self.k}-mers; use a "
                             f"length divisible by tokenizer.k={self.k}")
        kmers = base.reshape(-1, self.k).astype(np.int64)
        has_n = (kmers == N_CODE).any(axis=1)
        ids = (np.minimum(kmers, 3) * self._powers).sum(axis=1) + self.first
        return np.where(has_n, self.n_token, ids)

    def encode_text(self, text: str) -> np.ndarray:
        from domains.dna.genome import encode_bases

        return self.encode(encode_bases(text, "text"))

    def decode(self, ids: Any) -> str:
        return "".join(self.tokens[int(i)] if int(i) >= self.first else "" for i in ids)

    def rc_map(self) -> torch.Tensor:
        """int64 [vocab_size]: each id's reverse-complement id (specials and N map to themselves)."""
        comp = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
        index = {t: i for i, t in enumerate(self.tokens)}
        out = list(range(self.vocab_size))
        for i, token in enumerate(self.tokens[self.first:], self.first):
            out[i] = index["".join(comp[c] for c in reversed(token))]
        return torch.tensor(out, dtype=torch.int64)

    def reverse_complement(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [..., L] -> the ids of the reverse-complement sequence [..., L]."""
        return self.rc_map().to(ids.device)[ids].flip(-1)

    def bits_per_base(self, nats_per_token: float) -> float:
        return nats_per_token / (self.k * math.log(2))

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": "ssm-suite-dna", "k": self.k, "tokens": self.tokens}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DNATokenizer:
        if data.get("type") != "ssm-suite-dna":
            raise TokenizerMismatchError(f"not a DNA tokenizer (type={data.get('type')!r}); the checkpoint "
                                         "was not trained by `python -m domains.dna`")
        tok = cls(int(data["k"]))
        if tok.tokens != data.get("tokens"):
            raise TokenizerMismatchError(f"the stored {tok.k}-mer vocabulary differs from this version's")
        return tok

    def check_matches(self, other: DNATokenizer, source: str) -> None:
        """Raise :class:`TokenizerMismatchError` unless ``other`` (a checkpoint's) is this tokenizer."""
        if other.tokens != self.tokens:
            raise TokenizerMismatchError(
                f"{source} was trained with tokenizer.k={other.k} (vocab {other.vocab_size}), this run asks "
                f"for tokenizer.k={self.k} (vocab {self.vocab_size}); set tokenizer.k={other.k} or train a "
                f"new model")

    def __repr__(self) -> str:
        return f"DNATokenizer(k={self.k}, vocab_size={self.vocab_size})"
