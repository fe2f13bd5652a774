"""Small synthetic corpora for the language-domain data tests (fixtures only: no helper imports)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

_WORDS = (
    "the a of to and in is that for it as with was on be by this are from or have an they which one "
    "you were all we when there can been has more if will each about how up out them then she many "
    "some so these would other into her two like him see time could no make than first water been "
    "call who its now find long down day did get come made may part python token shard window model "
    "split cache seed state scan memory layer kernel matrix gradient"
).split()


def _make_text(rng: random.Random, n_words: int) -> str:
    """English-looking text with sentences, punctuation, newlines and a few non-ASCII characters."""
    out = []
    for i in range(n_words):
        w = rng.choice(_WORDS)
        if i % 11 == 0:
            w = w.capitalize()
        out.append(w)
        if i % 11 == 10:
            out[-1] += rng.choice([".", ".", "!", "?"]) + rng.choice([" ", "\n", "\n\n"])
        elif i % 7 == 3:
            out[-1] += ","
    text = " ".join(out).replace("\n ", "\n")
    if rng.random() < 0.3:
        text += " Café naïve résumé, π ≈ 3.14 🙂"
    return text


@pytest.fixture
def make_text():
    """``make_text(seed, n_words=200) -> str``: deterministic synthetic English."""
    def make(seed: int, n_words: int = 200) -> str:
        return _make_text(random.Random(seed), n_words)
    return make


@pytest.fixture
def text_corpus(tmp_path: Path, make_text):
    """A folder of 12 text documents in nested folders; returns (root, {absolute path: text})."""
    root = tmp_path / "corpus"
    texts = {}
    for i in range(12):
        sub = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"doc{i:02d}.{'txt' if i % 2 else 'rst'}"
        text = make_text(i, 150 + 20 * i)
        path.write_text(text, encoding="utf-8")
        texts[str(path.absolute())] = text
    return root, texts


_SENTENCE_WORDS = ("the model reads a long sequence of tokens and the state keeps what matters while the "
                   "scan runs in linear time over every position of the input").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 small text files of random sentences (a corpus the CLI tests train on)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        sentences = [" ".join(rng.choice(_SENTENCE_WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(40)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return folder

