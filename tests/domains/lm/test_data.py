"""prepare(): document splits, packed shards, manifest, cache reuse / rebuild / atomicity; window
datasets; unigram baseline and bits per byte."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from domains.lm import data as datamod
from domains.lm.corpus import CorpusError
from domains.lm.data import (
    DataConfig, PreparedData, RandomWindowDataset, SequentialWindowDataset, TokenShard,
    assign_splits, prepare, settings_key, unigram_baseline,
)
from domains.lm.tokenizer import LMTokenizer


def _config(tmp_path: Path, paths, **kw) -> DataConfig:
    base = dict(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), vocab_size=300,
                workers=1, val_fraction=0.2, test_fraction=0.2, seq_len=16)
    base.update(kw)
    return DataConfig(**base)


def _decoded_documents(data: PreparedData, split: str) -> list[str]:
    n = data.splits[split].documents
    return [data.tokenizer.decode(data.document_tokens(split, i)) for i in range(n)]


def _cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


# ------------------------------------------------------------------------------------------------
# prepare: contents


def test_prepare_packs_every_document_once_in_disjoint_splits(tmp_path, text_corpus, capsys):
    root, texts = text_corpus
    data = prepare(_config(tmp_path, [root]))
    m = data.manifest
    assert m["format_version"] == datamod.FORMAT_VERSION
    assert m["dtype"] == "uint16" and data.vocab_size == m["vocab_size"] == 300
    assert m["tokenizer"]["sha256"] == data.tokenizer.sha256
    assert m["split_fractions"] == pytest.approx({"train": 0.6, "val": 0.2, "test": 0.2})
    assert m["seed"] == 1234
    assert {s["path"]: (s["size"], s["mtime_ns"]) for s in m["sources"]} == {
        p: (os.path.getsize(p), os.stat(p).st_mtime_ns) for p in texts}

    per_split = {split: _decoded_documents(data, split) for split in ("train", "val", "test")}
    assert all(len(docs) >= 1 for docs in per_split.values())
    everything = [d for docs in per_split.values() for d in docs]
    assert Counter(everything) == Counter(texts.values())  # each document exactly once, uncut

    for split, docs in per_split.items():
        info = data.splits[split]
        tokens = data.tokens(split)
        offsets = data.doc_offsets(split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert info.documents == len(docs) == len(offsets) - 1
        assert info.tokens == len(tokens) == offsets[-1] + 1
        assert info.bytes == sum(len(d.encode("utf-8")) for d in docs)
        assert (tokens[offsets] == data.eot_id).all()  # EOT before every document and at the end
        assert (tokens == data.eot_id).sum() == info.documents + 1
        assert os.path.getsize(data.path / f"{split}.bin") == 2 * info.tokens
    out = capsys.readouterr().out
    assert "trained a byte-level BPE" in out and "tokenized 12 documents" in out


def test_splits_are_deterministic_and_depend_on_the_seed(tmp_path, text_corpus):
    root, _ = text_corpus
    a = prepare(_config(tmp_path / "a", [root]), verbose=False)
    b = prepare(_config(tmp_path / "b", [root]), verbose=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.tokens(split), b.tokens(split))
    assert a.tokenizer.sha256 == b.tokenizer.sha256
    c = prepare(_config(tmp_path / "c", [root], seed=7), verbose=False)
    assert {s: set(_decoded_documents(a, s)) for s in ("val", "test")} != \
           {s: set(_decoded_documents(c, s)) for s in ("val", "test")}


def test_worker_pool_gives_the_same_shards_as_in_process(tmp_path, text_corpus, monkeypatch):
    root, _ = text_corpus
    # Two documents a task: six tasks, more than the pool keeps in flight, so results must come
    # back in order from both workers.
    monkeypatch.setattr(datamod, "_BATCH_DOCS", 2)
    one = prepare(_config(tmp_path / "one", [root], workers=1), verbose=False)
    two = prepare(_config(tmp_path / "two", [root], workers=2), verbose=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(one.tokens(split), two.tokens(split))
        np.testing.assert_array_equal(one.doc_offsets(split), two.doc_offsets(split))


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path, make_text):
    # Each document owns a word that occurs nowhere else, often enough to earn a merge of its own:
    # the trained vocabulary must hold the train documents' words and none of val's or test's.
    root = tmp_path / "c"
    root.mkdir()
    words = {}
    for i in range(6):
        word = "".join(chr(ord("a") + (i * 7 + k) % 26) for k in range(3)).upper() * 2
        words[f"d{i}.txt"] = word
        (root / f"d{i}.txt").write_text((word + " ") * 200 + make_text(i, 50))
    data = prepare(_config(tmp_path, [root], val_fraction=0.3, test_fraction=0.3, vocab_size=400),
                   verbose=False)
    vocab = data.tokenizer.hf.get_vocab()
    for split in ("train", "val", "test"):
        for doc in _decoded_documents(data, split):
            word = doc.split(" ")[0]
            assert (word in vocab) == (split == "train"), (split, word)


def test_mixed_sources_jsonl_gzip_and_empty_files(tmp_path, make_text):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "plain.txt").write_text(make_text(1))
    (root / "empty.txt").write_text("")
    with gzip.open(root / "zipped.md.gz", "wt", encoding="utf-8") as f:
        f.write(make_text(2))
    records = [{"text": make_text(10 + i)} for i in range(4)] + [{"text": ""}]
    with gzip.open(root / "records.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.warns(UserWarning, match="empty"):
        data = prepare(_config(tmp_path, [root]), verbose=False)
    decoded = [d for s in ("train", "val", "test") for d in _decoded_documents(data, s)]
    expected = [make_text(1), make_text(2)] + [r["text"] for r in records[:4]]
    assert Counter(decoded) == Counter(expected)


def test_binary_file_stops_prepare_before_any_work_unless_skipped(tmp_path, text_corpus):
    root, texts = text_corpus
    (root / "blob.bin").write_bytes(bytes(range(256)))
    with pytest.raises(CorpusError, match="blob.bin looks binary"):
        prepare(_config(tmp_path, [root]), verbose=False)
    assert [n for n in _cache_entries(tmp_path / "cache") if not n.endswith(".lock")] == []
    with pytest.warns(UserWarning, match="skipping binary file"):
        data = prepare(_config(tmp_path, [root], skip_binary=True), verbose=False)
    assert sum(s.documents for s in data.splits.values()) == len(texts)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "e.txt").write_text("")
    with pytest.warns(UserWarning), pytest.raises(CorpusError, match="no non-empty document"):
        prepare(_config(tmp_path, [tmp_path / "c"]), verbose=False)


# ------------------------------------------------------------------------------------------------
# document split assignment


def test_assign_splits_fills_val_and_test_from_the_nearest_documents():
    f = (0.98, 0.01, 0.01)
    assert assign_splits(np.array([0.1, 0.2, 0.3]), f).tolist() == [0, 2, 1]
    assert assign_splits(np.array([0.985, 0.986, 0.987]), f).tolist() == [0, 1, 2]
    assert assign_splits(np.array([0.5, 0.6]), f).tolist() == [0, 1]  # < 3 documents: test stays empty
    assert assign_splits(np.array([0.995]), f).tolist() == [0]
    assert assign_splits(np.array([0.1, 0.2, 0.3]), (0.9, 0.1, 0.0)).tolist() == [0, 0, 1]
    assert assign_splits(np.zeros(0), f).tolist() == []


def test_assign_splits_follows_the_fractions_and_is_stable_under_added_documents():
    keys = [f"doc{i}.txt:0" for i in range(4000)]
    u = np.array([datamod._document_hashes(3, k)[0] for k in keys])
    split = assign_splits(u, (0.8, 0.15, 0.05))
    shares = np.bincount(split, minlength=3) / len(u)
    np.testing.assert_allclose(shares, [0.8, 0.15, 0.05], atol=0.02)
    more = assign_splits(np.concatenate([u, np.random.default_rng(0).random(500)]), (0.8, 0.15, 0.05))
    np.testing.assert_array_equal(more[:len(u)], split)


def test_three_documents_give_one_each_to_train_val_and_test(tmp_path, make_text):
    root = tmp_path / "three"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.txt").write_text(make_text(i, 40))
    data = prepare(_config(tmp_path, [root], val_fraction=0.01, test_fraction=0.01), verbose=False)
    assert [data.splits[s].documents for s in ("train", "val", "test")] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------
# cache: reuse, rebuild, atomicity


def _forbid_building(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("prepare rebuilt a cache that should have been reused")
    monkeypatch.setattr(datamod, "_tokenize_documents", fail)
    monkeypatch.setattr(datamod, "_scan", fail)
    monkeypatch.setattr(LMTokenizer, "train", fail)


def test_second_prepare_reuses_the_cache_without_tokenizing(tmp_path, text_corpus, monkeypatch, capsys):
    root, _ = text_corpus
    cfg = _config(tmp_path, [root])
    first = prepare(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    capsys.readouterr()
    _forbid_building(monkeypatch)
    second = prepare(_config(tmp_path, [root], workers=2, seq_len=8))  # not part of the cache key
    assert second.path == first.path and second.seq_len == 8
    assert "reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes
    np.testing.assert_array_equal(first.tokens("train"), second.tokens("train"))


def test_changed_added_or_removed_source_rebuilds_and_says_why(tmp_path, text_corpus, make_text, capsys):
    root, texts = text_corpus
    cfg = _config(tmp_path, [root])
    old = prepare(cfg)
    changed = Path(sorted(texts)[3])
    changed.write_text(texts[str(changed)] + " Appended sentence with zebra.", encoding="utf-8")
    capsys.readouterr()
    new = prepare(cfg)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "1 file(s) modified" in out and changed.name in out
    assert new.path == old.path
    entry = next(s for s in new.manifest["sources"] if s["path"] == str(changed))
    assert entry["size"] == changed.stat().st_size
    decoded = [d for s in ("train", "val", "test") for d in _decoded_documents(new, s)]
    assert changed.read_text(encoding="utf-8") in decoded

    (root / "new.txt").write_text(make_text(99))
    prepare(cfg)
    assert "1 file(s) added" in capsys.readouterr().out
    (root / "new.txt").unlink()
    prepare(cfg)
    assert "1 file(s) removed" in capsys.readouterr().out
    assert [n for n in _cache_entries(tmp_path / "cache") if not n.endswith(".lock")] == [old.path.name]


def test_user_tokenizer_that_no_longer_matches_the_cache_rebuilds(tmp_path, text_corpus, make_text, capsys):
    root, texts = text_corpus
    tok_path = tmp_path / "my_tokenizer.json"
    LMTokenizer.train(list(texts.values()), vocab_size=290).save(tok_path)
    cfg = _config(tmp_path, [root], tokenizer=str(tok_path))
    first = prepare(cfg)
    assert first.vocab_size == 290 and first.manifest["tokenizer"]["source"] == str(tok_path)
    capsys.readouterr()
    replacement = LMTokenizer.train([make_text(50 + i) for i in range(4)], vocab_size=320)
    replacement.save(tok_path)
    second = prepare(cfg)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "tokenizer" in out and "changed" in out
    assert second.manifest["tokenizer"]["sha256"] == replacement.sha256 and second.vocab_size == 320
    decoded = [d for s in ("train", "val", "test") for d in _decoded_documents(second, s)]
    assert Counter(decoded) == Counter(texts.values())


def test_other_settings_use_another_cache_folder(tmp_path, text_corpus):
    root, _ = text_corpus
    a = prepare(_config(tmp_path, [root]), verbose=False)
    b = prepare(_config(tmp_path, [root], vocab_size=310), verbose=False)
    c = prepare(_config(tmp_path, [root], val_fraction=0.3), verbose=False)
    assert len({a.path, b.path, c.path}) == 3 and a.path.exists()
    assert a.path.name == f"custom-{settings_key(_config(tmp_path, [root]).cache_settings())}"


def test_damaged_cache_is_rebuilt(tmp_path, text_corpus, capsys):
    root, _ = text_corpus
    cfg = _config(tmp_path, [root])
    data = prepare(cfg)
    with open(data.path / "train.bin", "r+b") as f:
        f.truncate(10)
    capsys.readouterr()
    again = prepare(cfg)
    assert "damaged" in capsys.readouterr().out
    assert os.path.getsize(again.path / "train.bin") == 2 * again.splits["train"].tokens


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_interrupted_prepare_leaves_no_cache_and_no_partial_files(tmp_path, text_corpus, monkeypatch, where):
    root, _ = text_corpus
    cfg = _config(tmp_path, [root])
    if where == "shard":
        real_write = datamod._ShardWriter.write
        calls = {"n": 0}

        def write(self, *args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt("interrupted mid-write")
            return real_write(self, *args)
        monkeypatch.setattr(datamod._ShardWriter, "write", write)
    else:
        def write_json(path, obj):
            Path(path).write_text(json.dumps(obj)[:100])  # half a manifest, then the crash
            raise OSError("disk full")
        monkeypatch.setattr(datamod, "_write_json", write_json)
    with pytest.raises((KeyboardInterrupt, OSError)):
        prepare(cfg, verbose=False)
    cache = tmp_path / "cache"
    assert [n for n in _cache_entries(cache) if not n.endswith(".lock")] == []
    monkeypatch.undo()
    data = prepare(cfg, verbose=False)
    assert _cache_entries(cache) == sorted([data.path.name, f".{data.path.name}.lock"])


def test_interrupted_rebuild_keeps_the_old_cache_whole(tmp_path, text_corpus, monkeypatch):
    root, texts = text_corpus
    cfg = _config(tmp_path, [root])
    old = prepare(cfg, verbose=False)
    old_manifest = (old.path / "manifest.json").read_text()
    changed = Path(sorted(texts)[0])
    changed.write_text("rewritten " * 30)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")
    monkeypatch.setattr(datamod, "_tokenize_documents", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(cfg, verbose=False)
    assert (old.path / "manifest.json").read_text() == old_manifest
    PreparedData.load(old.path)  # still complete and consistent
    assert [n for n in _cache_entries(tmp_path / "cache") if ".tmp-" in n or ".stale-" in n] == []


def test_leftovers_of_a_killed_run_are_removed(tmp_path, text_corpus):
    root, _ = text_corpus
    cfg = _config(tmp_path, [root])
    name = f"custom-{settings_key(cfg.cache_settings())}"
    leftover = tmp_path / "cache" / f".{name}.tmp-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "train.bin").write_bytes(b"\x00" * 64)
    data = prepare(cfg, verbose=False)
    assert not leftover.exists() and data.path.name == name


# ------------------------------------------------------------------------------------------------
# window datasets


def test_random_windows_are_seeded_shifted_slices():
    tokens = np.arange(40, dtype=np.uint16)
    ds = RandomWindowDataset(tokens, seq_len=6, num_samples=400, seed=5)
    starts = set()
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["input_ids"], item["labels"]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (6,)
        s = int(x[0])
        np.testing.assert_array_equal(x.numpy(), np.arange(s, s + 6))
        np.testing.assert_array_equal(y.numpy(), np.arange(s + 1, s + 7))
        starts.add(s)
    assert starts == set(range(40 - 6))  # every start in [0, N - L - 1], and no further
    again = RandomWindowDataset(tokens, seq_len=6, num_samples=400, seed=5)
    other = RandomWindowDataset(tokens, seq_len=6, num_samples=400, seed=6)
    assert [ds.start(i) for i in range(50)] == [again.start(i) for i in range(50)]
    assert [ds.start(i) for i in range(50)] != [other.start(i) for i in range(50)]
    assert len(RandomWindowDataset(tokens, seq_len=6)) == 39 // 6
    with pytest.raises(IndexError):
        ds[400]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 98, 99])
def test_sequential_windows_cover_every_target_exactly_once(seq_len):
    n = 100
    tokens = (np.arange(n) * 37 % 251).astype(np.uint16)
    ds = SequentialWindowDataset(tokens, seq_len, pad_id=255)
    assert len(ds) == math.ceil((n - 1) / seq_len) and ds.num_targets == n - 1
    inputs, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["input_ids"].numpy(), item["labels"].numpy()
        assert x.shape == y.shape == (seq_len,) and x.dtype == y.dtype == np.int64
        valid = y != -100
        assert valid[: valid.sum()].all()  # padding only at the end
        assert (x[~valid] == 255).all()
        inputs.append(x[valid])
        labels.append(y[valid])
    np.testing.assert_array_equal(np.concatenate(labels), tokens[1:])
    np.testing.assert_array_equal(np.concatenate(inputs), tokens[:-1])

    full = SequentialWindowDataset(tokens, seq_len, drop_last=True, split="train")
    assert len(full) == (n - 1) // seq_len and full.num_targets == len(full) * seq_len
    assert all((full[i]["labels"] != -100).all() for i in range(len(full)))


def test_split_smaller_than_one_window_is_a_clear_error():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError) as info:
        SequentialWindowDataset(tokens, seq_len=10, split="val")
    message = str(info.value)
    assert "val split has 10 tokens" in message and "seq_len + 1 = 11" in message
    assert "smaller data.seq_len (at most 9" in message and "more data" in message
    with pytest.raises(ValueError, match="train split has 10 tokens"):
        RandomWindowDataset(tokens, seq_len=12, split="train")
    assert len(SequentialWindowDataset(tokens, seq_len=9)) == 1  # exactly one window fits


def test_corpus_smaller_than_one_window_end_to_end(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    for i, text in enumerate(["one small document", "another one", "and a third"]):
        (root / f"{i}.txt").write_text(text)
    data = prepare(_config(tmp_path, [root], seq_len=512), verbose=False)
    for split in ("train", "val", "test"):
        n = data.splits[split].tokens
        with pytest.raises(ValueError, match=f"The {split} split has {n} tokens.*513"):
            data.eval_dataset(split)
    with pytest.raises(ValueError, match="train split"):
        data.train_dataset()
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("a single document " * 20)
    single = prepare(_config(tmp_path, [one]), verbose=False)
    assert single.splits["val"].tokens == 0 and single.splits["train"].documents == 1
    with pytest.raises(ValueError, match="val split has 0 tokens"):
        single.eval_dataset("val")


def test_prepared_datasets_read_the_shards_and_pickle_without_the_tokens(tmp_path, text_corpus):
    root, _ = text_corpus
    data = prepare(_config(tmp_path, [root], seq_len=12), verbose=False)
    train = data.tokens("train")
    ds = data.train_dataset(num_samples=10, seed=1)
    assert ds.seq_len == 12
    for i in range(len(ds)):
        s = ds.start(i)
        np.testing.assert_array_equal(ds[i]["input_ids"].numpy(), train[s:s + 12])
        np.testing.assert_array_equal(ds[i]["labels"].numpy(), train[s + 1:s + 13])
    seq = data.train_dataset(mode="sequential")
    assert len(seq) == (len(train) - 1) // 12
    val = data.eval_dataset("val")
    assert val.num_targets == data.splits["val"].targets
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 < train.nbytes  # DataLoader workers reopen the memmap
    clone = pickle.loads(blob)
    assert torch.equal(clone[3]["input_ids"], ds[3]["input_ids"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 12)
    assert batch["input_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="mode"):
        data.train_dataset(mode="shuffled")
    assert isinstance(data.shard("test"), TokenShard) and len(data.shard("test")) == data.splits["test"].tokens


# ------------------------------------------------------------------------------------------------
# unigram baseline and bits per byte


def test_unigram_baseline_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    train = rng.zipf(1.5, 5000).clip(max=49).astype(np.uint16)
    val = rng.zipf(1.5, 800).clip(max=59).astype(np.uint16)  # ids 50..59 never seen in train
    vocab, alpha = 64, 0.5
    got = unigram_baseline(train, val, vocab, eval_bytes=3000, smoothing=alpha)
    counts = Counter(train.tolist())
    total = len(train) + alpha * vocab
    nll = [-math.log((counts.get(t, 0) + alpha) / total) for t in val[1:].tolist()]
    want = sum(nll) / len(nll)
    assert got.cross_entropy == pytest.approx(want, rel=1e-12)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-12)
    assert got.bits_per_byte == pytest.approx(sum(nll) / (3000 * math.log(2)), rel=1e-12)
    entropy = -sum(c / len(train) * math.log(c / len(train)) for c in counts.values())
    assert got.train_entropy == pytest.approx(entropy, rel=1e-12)


def test_unigram_baseline_of_a_uniform_source_is_log_k():
    train = np.tile(np.arange(4, dtype=np.uint16), 250)
    got = unigram_baseline(train, np.arange(4, dtype=np.uint16)[[0, 1, 2, 3, 0]], 4, smoothing=0.0)
    assert got.cross_entropy == pytest.approx(math.log(4)) and got.perplexity == pytest.approx(4.0)
    assert got.train_entropy == pytest.approx(math.log(4)) and got.bits_per_byte is None
    with pytest.raises(ValueError, match="val split has 1 tokens"):
        unigram_baseline(train, train[:1], 4)


def test_prepared_unigram_baseline_and_bits_per_byte(tmp_path, text_corpus):
    root, _ = text_corpus
    data = prepare(_config(tmp_path, [root]), verbose=False)
    base = data.unigram_baseline("val")
    direct = unigram_baseline(np.asarray(data.tokens("train")), np.asarray(data.tokens("val")),
                              data.vocab_size, data.splits["val"].bytes)
    assert base == direct
    assert 1.0 < base.perplexity < data.vocab_size
    info = data.splits["val"]
    assert data.bits_per_byte(base.cross_entropy, "val") == pytest.approx(base.bits_per_byte)
    assert data.bits_per_byte(1.0, "val") == pytest.approx((info.tokens - 1) / (info.bytes * math.log(2)))


# ------------------------------------------------------------------------------------------------
# configuration


def test_data_config_from_mappings_and_validation(tmp_path):
    cfg = DataConfig.from_dict({"paths": ["a", "b"], "vocab_size": 512})
    assert cfg.paths == ["a", "b"] and cfg.vocab_size == 512 and cfg.corpus_label == "custom"
    assert DataConfig.coerce(None).corpus == "python-docs"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vocab'\].*known keys"):
        DataConfig.from_dict({"vocab": 1})
    with pytest.raises(ValueError, match="leave documents for train"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="workers"):
        DataConfig(workers=0)
    omegaconf = pytest.importorskip("omegaconf")
    dc = omegaconf.OmegaConf.create({"paths": [str(tmp_path)], "seq_len": 8})
    cfg = DataConfig.coerce(dc)
    assert cfg.paths == [str(tmp_path)] and type(cfg.paths) is list and cfg.seq_len == 8
    # the cache key ignores seq_len and workers, not the seed
    k = settings_key(cfg.cache_settings())
    assert settings_key(DataConfig(paths=[str(tmp_path)], workers=3).cache_settings()) == k
    assert settings_key(DataConfig(paths=[str(tmp_path)], seed=1).cache_settings()) != k
