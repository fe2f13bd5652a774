"""Byte-level BPE tokenizer: training, special tokens, lossless round trip, canonical hash, loading."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from domains.lm import tokenizer as tokmod
from domains.lm.tokenizer import EOT_TOKEN, LMTokenizer, token_dtype


@pytest.fixture
def texts(make_text):
    return [make_text(i, 300) for i in range(8)]


@pytest.fixture
def tok(texts):
    return LMTokenizer.train(texts, vocab_size=300)


def test_training_gives_the_requested_vocab_and_special_ids(tok):
    assert tok.vocab_size == 300
    assert (tok.eot_id, tok.pad_id) == (0, 1)
    assert tok.hf.id_to_token(0) == "<|endoftext|>" and tok.hf.id_to_token(1) == "<|pad|>"
    assert tok.dtype == np.uint16
    # merges were learned: frequent words take fewer tokens than their bytes
    assert len(tok.encode("the water")) < len(b"the water")


@pytest.mark.parametrize("text", [
    "", "a", "Hello, world!\n", "  leading and trailing spaces  ", "tabs\tand\r\nCRLF\n\n",
    "Café naïve 日本語 🙂 — π ≈ 3.14159", "def f(x):\n    return x ** 2  # comment\n",
    "\x01 control \x7f chars",
])
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text  # numpy ids decode too


def test_special_token_text_inside_a_document_is_not_a_separator(tok):
    text = f"before{EOT_TOKEN}after <|pad|>"
    ids = tok.encode(text)
    assert tok.eot_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text
    # while decoding a real separator shows it
    assert tok.decode([tok.eot_id] + tok.encode("x")) == EOT_TOKEN + "x"
    assert tok.decode([tok.eot_id] + tok.encode("x"), skip_special_tokens=True) == "x"


def test_hash_is_sha256_of_canonical_json_and_survives_save_load_and_reformatting(tok, texts, tmp_path):
    canonical = json.dumps(json.loads(tok.hf.to_str()), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    assert tok.sha256 == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert LMTokenizer.load(path).sha256 == tok.sha256
    assert LMTokenizer.load(tmp_path).sha256 == tok.sha256  # a folder holding tokenizer.json
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert LMTokenizer.load(pretty).sha256 == tok.sha256
    # training is deterministic; a different vocabulary is a different tokenizer
    assert LMTokenizer.train(texts, vocab_size=300).sha256 == tok.sha256
    assert LMTokenizer.train(texts, vocab_size=280).sha256 != tok.sha256


def test_encode_documents_packs_each_document_after_an_eot(tok):
    docs = ["first doc", "", "second, longer document."]
    tokens, lengths = tok.encode_documents(docs)
    expected = []
    for d in docs:
        expected += [tok.eot_id] + tok.encode(d)
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(tok.encode(d)) + 1 for d in docs]
    empty_tokens, empty_lengths = tok.encode_documents([])
    assert empty_tokens.size == 0 and empty_lengths.size == 0


def test_worker_functions_match_in_process_encoding(tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # restored after the test
    monkeypatch.setattr(tokmod, "_worker_tokenizer", None)
    with pytest.raises(RuntimeError, match="before init_encode_worker"):
        tokmod.encode_in_worker(["x"])
    tokmod.init_encode_worker(tok.hf.to_str(), tok.eot_token, tok.pad_token)
    docs = ["alpha beta", "gamma <|endoftext|> delta"]
    got_tokens, got_lengths = tokmod.encode_in_worker(docs)
    want_tokens, want_lengths = tok.encode_documents(docs)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_array_equal(got_lengths, want_lengths)


def test_too_small_vocab_and_equal_special_tokens_are_errors(texts):
    with pytest.raises(ValueError, match="at least 258"):
        LMTokenizer.train(texts, vocab_size=257)
    with pytest.raises(ValueError, match="must differ"):
        LMTokenizer.train(texts, vocab_size=300, pad_token=EOT_TOKEN)


def test_loaded_tokenizer_without_eot_is_an_error_and_pad_falls_back_to_eot(tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_tokens([chr(c) for c in range(ord("a"), ord("z") + 1)])
    hf.add_special_tokens(["</s>"])
    path = tmp_path / "user.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match=r"no '<\|endoftext\|>' token.*data.eot_token"):
        LMTokenizer.load(path)
    user = LMTokenizer.load(path, eot_token="</s>")
    assert user.pad_id == user.eot_id == hf.token_to_id("</s>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LMTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="not a HF tokenizers JSON"):
        LMTokenizer.load(tmp_path / "junk.json")


def test_token_dtype_boundaries():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200_000) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)
