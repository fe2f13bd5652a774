"""The character and k-mer tokenizers: ids, reverse complement in token space, bits per base, mismatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domains.dna.genome import reverse_complement_codes
from domains.dna.tokenizer import DNATokenizer, TokenizerMismatchError


def test_character_ids():
    tok = DNATokenizer(1)
    assert tok.vocab_size == 10
    assert tok.encode_text("ACGTNacg").tolist() == [5, 6, 7, 8, 9, 5, 6, 7]  # case is not an id
    assert tok.decode(tok.encode_text("ACGTN")) == "ACGTN"


def test_kmer_ids():
    tok = DNATokenizer(3)
    assert tok.vocab_size == 5 + 64 + 1
    ids = tok.encode_text("AAAAACTTTNAC")
    assert ids.tolist() == [5, 5 + 1, 5 + 63, tok.n_token]  # AAA, AAC, TTT, NAC
    with pytest.raises(ValueError, match="not a whole number of 3-mers"):
        tok.encode_text("ACGT")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reverse_complement_in_token_space(k: int):
    tok = DNATokenizer(k)
    rng = np.random.default_rng(k)
    codes = rng.choice(np.array([0, 1, 2, 3, 4], dtype=np.uint8), size=12 * k, p=[.24, .24, .24, .24, .04])
    ids = torch.from_numpy(tok.encode(codes))
    expected = torch.from_numpy(tok.encode(reverse_complement_codes(codes)))
    assert torch.equal(tok.reverse_complement(ids), expected)
    rc_map = tok.rc_map()
    assert torch.equal(rc_map[rc_map], torch.arange(tok.vocab_size))


def test_bits_per_base_and_round_trip():
    assert DNATokenizer(1).bits_per_base(math.log(4)) == pytest.approx(2.0)
    assert DNATokenizer(2).bits_per_base(math.log(16)) == pytest.approx(2.0)
    tok = DNATokenizer(2)
    assert DNATokenizer.from_dict(tok.to_dict()).tokens == tok.tokens


def test_mismatch_names_both():
    with pytest.raises(TokenizerMismatchError, match="tokenizer.k=1 .*tokenizer.k=3"):
        DNATokenizer(3).check_matches(DNATokenizer(1), "export x")
    with pytest.raises(TokenizerMismatchError, match="not a DNA tokenizer"):
        DNATokenizer.from_dict({"model": {"type": "BPE"}})
    with pytest.raises(ValueError, match="tokenizer.k"):
        DNATokenizer(0)
