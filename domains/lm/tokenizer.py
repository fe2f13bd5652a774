"""The language domain's tokenizer: a byte-level BPE trained with HF ``tokenizers``, or a user's
``tokenizer.json``, behind one small class.

Byte-level BPE (GPT-2's scheme): text is UTF-8 bytes mapped to 256 base symbols, so every string
encodes without an unknown token and ``decode(encode(text)) == text`` exactly. Two special tokens:

- ``<|endoftext|>`` (id 0 in a trained tokenizer): the document separator. The data pipeline packs a
  split as ``EOT d1 EOT d2 ... EOT dn EOT``, so it is also each document's BOS;
- ``<|pad|>`` (id 1): fills the last, partial window of an evaluation pass (its labels are -100, so the
  id never enters a loss). A loaded tokenizer without it pads with the EOT id.

Special-token strings that occur literally in a document are encoded as ordinary text, so no document
can inject a separator.

The tokenizer's identity for cache matching is :attr:`LMTokenizer.sha256`, the sha256 of its canonical
JSON (HF's serialization, re-dumped with sorted keys and no whitespace), so the same tokenizer hashes
the same whether it was trained here or pretty-printed by someone else.

This module imports no torch: the data pipeline's worker processes import it (``spawn`` start method)
to tokenize documents, and start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
NUM_BYTES = 256  # the byte-level base alphabet


def token_dtype(vocab_size: int) -> np.dtype:
    """The numpy dtype of packed token ids: uint16 when ``vocab_size <= 65535``, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class LMTokenizer:
    """A ``tokenizers.Tokenizer`` with the language domain's conventions.

    Attributes:
        vocab_size: max token id + 1 (the embedding size a model needs).
        eot_id:     id of the end-of-text / document-separator token.
        pad_id:     id of the pad token (``eot_id`` when the tokenizer has none).
        sha256:     hex sha256 of the canonical JSON (cache matching).
        dtype:      numpy dtype of packed ids (:func:`token_dtype`).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eot_token: str = EOT_TOKEN,
                 pad_token: str = PAD_TOKEN, source: str = "") -> None:
        self.hf = tokenizer
        self.source = source or "in memory"
        eot_id = tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise ValueError(
                f"The tokenizer ({self.source}) has no {eot_token!r} token, which the data pipeline "
                "uses as document separator. Fix: set data.eot_token to the tokenizer's end-of-text "
                "token (e.g. '</s>'), or let the pipeline train a tokenizer (data.tokenizer=null)."
            )
        pad_id = tokenizer.token_to_id(pad_token)
        self.eot_token, self.pad_token = eot_token, pad_token
        self.eot_id = eot_id
        self.pad_id = eot_id if pad_id is None else pad_id
        # Literal "<|endoftext|>" inside a document is text, not a separator.
        self.hf.encode_special_tokens = True
        ids = list(tokenizer.get_vocab(with_added_tokens=True).values())
        self.vocab_size = max(ids) + 1
        self.dtype = token_dtype(self.vocab_size)
        self.canonical_json = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True,
                                         separators=(",", ":"), ensure_ascii=False)
        self.sha256 = hashlib.sha256(self.canonical_json.encode("utf-8")).hexdigest()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, eot_token: str = EOT_TOKEN,
              pad_token: str = PAD_TOKEN, min_frequency: int = 2, length: int | None = None
              ) -> LMTokenizer:
        """Train a byte-level BPE on ``texts`` (an iterable of documents, consumed once).

        ``vocab_size`` counts the 256 byte symbols, the two special tokens and the merges; a corpus too
        small to have that many pairs seen ``min_frequency`` times gives a smaller vocabulary.
        ``length`` (the number of texts, if known) only feeds HF's progress accounting.
        """
        minimum = NUM_BYTES + 2
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at "
                             f"least {minimum} (256 bytes + 2 special tokens); use e.g. 8192")
        if eot_token == pad_token:
            raise ValueError(f"eot_token and pad_token must differ, both are {eot_token!r}")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eot_token, pad_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        hf.train_from_iterator(texts, trainer, length=length)
        return cls(hf, eot_token, pad_token, source=f"trained byte-level BPE, vocab {vocab_size}")

    @classmethod
    def from_str(cls, json_str: str, eot_token: str = EOT_TOKEN, pad_token: str = PAD_TOKEN,
                 source: str = "") -> LMTokenizer:
        return cls(tokenizers.Tokenizer.from_str(json_str), eot_token, pad_token, source)

    @classmethod
    def load(cls, path: str | os.PathLike, eot_token: str = EOT_TOKEN, pad_token: str = PAD_TOKEN
             ) -> LMTokenizer:
        """Load a HF ``tokenizer.json`` (a file, or a folder that holds one)."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist (data.tokenizer should "
                                    "name a HF tokenizer.json, or be null to train one)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{p} is not a HF tokenizers JSON file ({e})") from e
        return cls(hf, eot_token, pad_token, source=str(p.absolute()))

    def save(self, path: str | os.PathLike) -> None:
        """Write HF's ``tokenizer.json`` form (loadable by ``tokenizers`` and ``transformers``)."""
        self.hf.save(os.fspath(path))

    # -- use ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (HF parallelizes over texts unless TOKENIZERS_PARALLELISM=false)."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, numpy array or 1-D tensor); special tokens kept by default."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pack documents for a shard: each becomes ``[eot_id] + encode(text)``.

        Returns (tokens [sum(lengths)] of :attr:`dtype`, lengths [len(texts)] int64), lengths counting
        each document's leading EOT.
        """
        encoded = self.encode_batch(texts)
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for ids in encoded:
            tokens[pos] = self.eot_id
            tokens[pos + 1:pos + 1 + len(ids)] = ids
            pos += len(ids) + 1
        return tokens, lengths

    def __repr__(self) -> str:
        return (f"LMTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id}, "
                f"sha256={self.sha256[:12]}..., source={self.source!r})")


# ------------------------------------------------------------------------------------------------
# Worker-process side of the data pipeline's tokenizing pool (module-level so that "spawn" workers
# find them by import, without torch).

_worker_tokenizer: LMTokenizer | None = None


def init_encode_worker(tokenizer_json: str, eot_token: str, pad_token: str) -> None:
    """Pool initializer: build the tokenizer once per worker process."""
    global _worker_tokenizer
    # One process per core already: HF's own thread pool inside each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = LMTokenizer.from_str(tokenizer_json, eot_token, pad_token, source="worker")


def encode_in_worker(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pool task: :meth:`LMTokenizer.encode_documents` with the worker's tokenizer."""
    if _worker_tokenizer is None:
        raise RuntimeError("encode_in_worker called before init_encode_worker")
    return _worker_tokenizer.encode_documents(texts)


__all__ = ["EOT_TOKEN", "PAD_TOKEN", "LMTokenizer", "encode_in_worker", "init_encode_worker",
           "token_dtype"]
