"""The language domain's data pipeline: corpus -> document splits -> tokenizer -> packed token shards.

Typical use (what ``python -m domains.lm train`` wires to its Hydra ``data`` config)::

    data = prepare(cfg.data)                        # DataConfig, dict or DictConfig; cached
    train = data.train_dataset(num_samples=steps * batch_size, seed=cfg.seed)   # random windows
    val = data.eval_dataset("val")                  # sequential, covers the split
    base = data.unigram_baseline("val")             # print f"val ppl {ppl:.1f} vs unigram {base.perplexity:.1f}"
    bpb = data.bits_per_byte(val_loss, "val")

``prepare`` does, in order:

1. finds the corpus's source files (:mod:`domains.lm.corpus`) and reads every document once (a scan
   that fails early on a binary or malformed file, before minutes of tokenizing);
2. assigns each DOCUMENT to train / val / test from a hash of (seed, document key), so a split is
   deterministic, never cuts a document, and does not move when other documents come or go; val and
   test get at least one document each when there are >= 3 (nearest-hash documents are moved);
3. trains a byte-level BPE on (a byte-capped sample of) the TRAIN split only, so no val/test text
   leaks into the tokenizer; or loads the user's ``tokenizer.json``;
4. tokenizes the documents in a pool of worker processes (``spawn``; ``workers`` of them, default
   min(4, cpus); 1 = in this process, where HF tokenizers runs its own thread per core: on a 2-core
   machine that was as fast as the pool) and writes per split one packed shard, read back as a numpy
   memmap: ``EOT d1 EOT d2 ... EOT dn EOT`` (EOT = ``<|endoftext|>``, so each document is preceded by
   a BOS/separator and followed by an end-of-text), uint16 when the vocabulary has <= 65535 ids
   else uint32; plus each split's document offsets;
5. writes ``manifest.json`` (format version, settings and their key, tokenizer sha256 and ids, vocab
   size, dtype, per split tokens / documents / UTF-8 bytes, split fractions and seed, every source
   file with size and mtime).

Everything is written into a temporary folder next to the cache folder and renamed into place with
``os.replace`` only when complete, so an interrupted prepare never leaves a half cache under the real
name (its leftover temporary folder is removed by the next run). A file lock makes concurrent
prepares (one per DDP rank) wait for the first instead of racing. A later run with the same settings
reuses the cache when the sources (paths, sizes, mtimes), the tokenizer (sha256) and the stored files
still match; otherwise it prints why and rebuilds.

Cache layout, ``<cache_dir>/<corpus>-<key>/`` with ``key`` a hash of the settings that shape the
data (not ``seq_len`` or ``workers``)::

    manifest.json  tokenizer.json
    train.bin  val.bin  test.bin                   packed ids, little-endian uint16/uint32
    train.docs.npy  val.docs.npy  test.docs.npy    int64 [D + 1] document offsets (below)

Document ``i`` of a split is ``tokens[offsets[i]:offsets[i + 1]]`` (its leading EOT and its text);
``offsets[D]`` is the position of the closing EOT, the split's last token. An empty split has no
tokens and ``offsets == [0]``.

Bits per byte: a sequential pass over a split predicts its ``tokens - 1`` targets (every token but the
first EOT); ``bpb = mean_nats * (tokens - 1) / (bytes * ln 2)`` with ``bytes`` the UTF-8 size of the
split's document texts (separators excluded), see :meth:`PreparedData.bits_per_byte`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import secrets
import shutil
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core.checkpoint import replace_folder
from domains.lm.corpus import (
    PYTHON_DOCS, CorpusError, Document, SourceFile, document_key, iter_documents, resolve_sources,
)
from domains.lm.tokenizer import (
    EOT_TOKEN, PAD_TOKEN, LMTokenizer, encode_in_worker, init_encode_worker,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
IGNORE_INDEX = -100  # labels the model's loss skips (core.backbone's convention)
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
_DISK_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# A pool task: documents up to this many characters or this many documents, whichever comes first.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 512


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataConfig:
    """What ``prepare`` builds. Hydra's ``data`` group fills it (unknown keys are errors).

    corpus:        named corpus: ``python-docs`` (default; Debian package python3.11-doc) or
                   ``python-stdlib`` (this interpreter's standard library, always present).
    paths:         user corpus: files, folders (recursive), globs, ``.jsonl``, ``.parquet``, ``.gz``;
                   when given it replaces ``corpus``.
    text_field:    the text field of ``.jsonl`` records / column of ``.parquet`` files.
    skip_binary:   skip binary (NUL bytes / non-UTF-8) text files with a warning instead of failing.
    tokenizer:     path of a HF ``tokenizer.json`` to use; None trains a byte-level BPE on train.
    vocab_size:    size of the trained BPE (256 bytes + 2 special tokens + merges).
    min_frequency: a merge needs a pair seen at least this often.
    tokenizer_train_bytes: at most this much train text (a seeded sample of documents) trains the BPE.
    eot_token / pad_token: the separator / padding tokens.
    val_fraction / test_fraction: expected share of documents (train gets the rest).
    seed:          seeds the document split.
    workers:       tokenizing processes; None = min(4, cpus); 1 = in this process.
    cache_dir:     where cache folders go (``<cache_dir>/<corpus>-<settings key>``).
    seq_len:       default window length of the datasets (not part of the cache key).
    """

    corpus: str = PYTHON_DOCS
    paths: list[str] | None = None
    text_field: str = "text"
    skip_binary: bool = False
    tokenizer: str | None = None
    vocab_size: int = 8192
    min_frequency: int = 2
    tokenizer_train_bytes: int = 64_000_000
    eot_token: str = EOT_TOKEN
    pad_token: str = PAD_TOKEN
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    seed: int = 1234
    workers: int | None = None
    cache_dir: str = "data_cache"
    seq_len: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [os.fspath(self.paths)]
        elif self.paths is not None:
            self.paths = [os.fspath(p) for p in self.paths]  # also turns an OmegaConf ListConfig into a list
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"data.val_fraction + data.test_fraction must leave documents for train, "
                             f"got {self.val_fraction} + {self.test_fraction} >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"data.workers must be >= 1 (or null for min(4, cpus)), got {self.workers}")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.tokenizer_train_bytes < 1:
            raise ValueError(f"data.tokenizer_train_bytes must be positive, got {self.tokenizer_train_bytes}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """From a dict or an OmegaConf ``DictConfig``; unknown keys are errors naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**{k: data[k] for k in data})

    @classmethod
    def coerce(cls, config: DataConfig | Mapping[str, Any] | None) -> DataConfig:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise TypeError(f"expected a DataConfig or a mapping, got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)

    @property
    def corpus_label(self) -> str:
        """The cache folder's prefix: the named corpus, or ``custom`` for user paths."""
        return "custom" if self.paths else self.corpus

    def cache_settings(self) -> dict[str, Any]:
        """Everything that shapes the prepared data: its hash names the cache folder."""
        if self.tokenizer:
            tok: dict[str, Any] = {"file": os.path.abspath(os.path.expanduser(self.tokenizer))}
        else:
            tok = {"train": "byte-level-bpe", "vocab_size": self.vocab_size,
                   "min_frequency": self.min_frequency, "train_bytes": self.tokenizer_train_bytes}
        return {
            "format_version": FORMAT_VERSION,
            "corpus": None if self.paths else self.corpus,
            "paths": [os.path.abspath(os.path.expanduser(p)) for p in self.paths] if self.paths else None,
            "text_field": self.text_field,
            "skip_binary": self.skip_binary,
            "tokenizer": tok,
            "eot_token": self.eot_token,
            "pad_token": self.pad_token,
            "split_fractions": list(self.split_fractions),
            "seed": self.seed,
        }


def default_workers() -> int:
    """min(4, the CPUs this process may run on)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def settings_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the settings' canonical JSON."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Document splits


def _document_hashes(seed: int, key: str) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) from (seed, key): the split draw and the tokenizer sample draw."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    scale = 2.0 ** -64
    return int.from_bytes(digest[:8], "big") * scale, int.from_bytes(digest[8:16], "big") * scale


def assign_splits(u: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Split of each document (0 train, 1 val, 2 test) from its uniform hash ``u`` [D] float64.

    Document d goes to the split whose interval of [0, 1) (train first, then val, then test, with the
    given lengths) holds ``u[d]``. Then every split with a positive fraction that got no document
    takes one from the split holding the most (train on ties), the document whose ``u`` lies nearest
    to its interval, as long as that leaves the donor one (train takes one regardless): so one
    document is train, and with >= 3 documents train, val and test each have one. Returns int8 [D].
    """
    u = np.asarray(u, dtype=np.float64)
    bounds = np.cumsum([0.0, *fractions])
    bounds[-1] = 1.0  # rounding must not leave a gap at the top
    split = np.searchsorted(bounds[1:-1], u, side="right").astype(np.int8)
    for s in (TRAIN, VAL, TEST):
        if fractions[s] <= 0 or np.any(split == s):
            continue
        counts = np.bincount(split, minlength=3)
        donor = int(np.argmax(counts))
        if counts[donor] == 0 or (counts[donor] < 2 and s != TRAIN):
            break  # fewer documents than wanted splits: test (then val) stays empty, train never
        candidates = np.flatnonzero(split == donor)
        lo, hi = bounds[s], bounds[s + 1]
        distance = np.maximum(lo - u[candidates], 0.0) + np.maximum(u[candidates] - hi, 0.0)
        split[candidates[int(np.argmin(distance))]] = s
    return split


@dataclass
class _Scan:
    """One row per non-empty document, in corpus order."""

    source: np.ndarray  # int64 [D] index into the sources
    index: np.ndarray   # int64 [D] line/row in the source
    nbytes: np.ndarray  # int64 [D] UTF-8 bytes of the text
    u: np.ndarray       # float64 [D] split draw
    v: np.ndarray       # float64 [D] tokenizer-sample draw


def _scan(sources: Sequence[SourceFile], cfg: DataConfig) -> _Scan:
    src, idx, nbytes, us, vs = array("q"), array("q"), array("q"), array("d"), array("d")
    for doc in iter_documents(sources, cfg.text_field, cfg.skip_binary, warn=True):
        u, v = _document_hashes(cfg.seed, document_key(sources[doc.source], doc))
        src.append(doc.source)
        idx.append(doc.index)
        nbytes.append(len(doc.text.encode("utf-8")))
        us.append(u)
        vs.append(v)
    arrays = [np.frombuffer(a, dtype=np.int64 if a.typecode == "q" else np.float64) if len(a)
              else np.zeros(0, np.int64 if a.typecode == "q" else np.float64)
              for a in (src, idx, nbytes, us, vs)]
    return _Scan(*arrays)


def _aligned_documents(sources: Sequence[SourceFile], cfg: DataConfig, scan: _Scan
                       ) -> Iterator[tuple[int, Document]]:
    """(row, document) for every document again, checked against the scan's order."""
    for row, doc in enumerate(iter_documents(sources, cfg.text_field, cfg.skip_binary, warn=False)):
        if row >= len(scan.source) or doc.source != scan.source[row] or doc.index != scan.index[row]:
            raise CorpusError(f"{sources[doc.source].path} changed while it was being prepared; "
                              "run prepare again")
        yield row, doc


# ------------------------------------------------------------------------------------------------
# Building a cache folder


def _log_fn(verbose: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if verbose:
            print(f"[data] {message}", flush=True)
    return log


def _train_tokenizer(sources: Sequence[SourceFile], cfg: DataConfig, scan: _Scan, split: np.ndarray,
                     log: Callable[[str], None]) -> LMTokenizer:
    train_rows = split == TRAIN
    train_bytes = int(scan.nbytes[train_rows].sum())
    budget = cfg.tokenizer_train_bytes
    # Each train document is kept with probability p from its own hash, so a capped sample is spread
    # over the whole corpus instead of being its first files.
    p = min(1.0, budget / max(train_bytes, 1))
    used = {"bytes": 0, "docs": 0}

    def texts() -> Iterator[str]:
        for row, doc in _aligned_documents(sources, cfg, scan):
            if split[row] != TRAIN or scan.v[row] >= p:
                continue
            room = budget - used["bytes"]
            text = doc.text if scan.nbytes[row] <= room else doc.text[:room]
            used["bytes"] += min(int(scan.nbytes[row]), room)
            used["docs"] += 1
            yield text
            if used["bytes"] >= budget:
                return

    t0 = time.perf_counter()
    tok = LMTokenizer.train(texts(), cfg.vocab_size, cfg.eot_token, cfg.pad_token, cfg.min_frequency)
    log(f"trained a byte-level BPE (vocab {tok.vocab_size}) on {used['bytes'] / 1e6:.2f} MB of train "
        f"text ({used['docs']} documents) in {time.perf_counter() - t0:.1f}s")
    return tok


class _ShardWriter:
    """Appends documents (each already ``[EOT] + ids``) to one split's ``.bin``; records offsets."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, eot_id: int) -> None:
        self.name = name
        self.bin_path = folder / f"{name}.bin"
        self.docs_path = folder / f"{name}.docs.npy"
        self.dtype = _DISK_DTYPES[dtype.name]
        self.eot_id = eot_id
        self.file = open(self.bin_path, "wb")
        self.starts = array("q")
        self.tokens = 0
        self.bytes = 0

    def write(self, doc_tokens: np.ndarray, nbytes: int) -> None:
        self.starts.append(self.tokens)
        self.file.write(memoryview(np.ascontiguousarray(doc_tokens, dtype=self.dtype)))
        self.tokens += len(doc_tokens)
        self.bytes += nbytes

    def close(self) -> dict[str, Any]:
        if self.starts:  # the closing EOT ends the last document
            self.file.write(memoryview(np.array([self.eot_id], dtype=self.dtype)))
            self.tokens += 1
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        offsets = np.array([*self.starts, max(self.tokens - 1, 0)], dtype=np.int64)
        np.save(self.docs_path, offsets)
        return {"file": self.bin_path.name, "doc_offsets_file": self.docs_path.name,
                "tokens": self.tokens, "documents": len(self.starts), "bytes": self.bytes}

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()


def _document_batches(sources: Sequence[SourceFile], cfg: DataConfig, scan: _Scan
                      ) -> Iterator[tuple[list[int], list[str]]]:
    rows: list[int] = []
    texts: list[str] = []
    chars = 0
    for row, doc in _aligned_documents(sources, cfg, scan):
        rows.append(row)
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
            yield rows, texts
            rows, texts, chars = [], [], 0
    if texts:
        yield rows, texts


def _encode_batches(batches: Iterator[tuple[list[int], list[str]]], tok: LMTokenizer, workers: int
                    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """(rows, tokens, lengths) per batch, in order; ``workers`` > 1 tokenizes in a process pool."""
    if workers <= 1:
        for rows, texts in batches:
            yield (rows, *tok.encode_documents(texts))
        return
    # spawn, not fork: the parent may hold torch / tokenizers thread pools that a fork would copy
    # mid-state. Workers import only domains.lm.tokenizer (no torch), so they start in well under a
    # second.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=init_encode_worker,
                  initargs=(tok.hf.to_str(), tok.eot_token, tok.pad_token)) as pool:
        pending: deque = deque()
        for rows, texts in batches:
            pending.append((rows, pool.apply_async(encode_in_worker, (texts,))))
            # Pool.imap would read the whole corpus ahead into its queue; this keeps memory bounded.
            if len(pending) >= 2 * workers:
                rows_done, result = pending.popleft()
                yield (rows_done, *result.get())
        while pending:
            rows_done, result = pending.popleft()
            yield (rows_done, *result.get())


def _tokenize_documents(folder: Path, sources: Sequence[SourceFile], cfg: DataConfig, scan: _Scan,
                        split: np.ndarray, tok: LMTokenizer, workers: int, log: Callable[[str], None]
                        ) -> dict[str, dict[str, Any]]:
    """Write every split's shard and document offsets into ``folder``; returns the per-split stats."""
    t0 = time.perf_counter()
    writers = [_ShardWriter(folder, name, tok.dtype, tok.eot_id) for name in SPLITS]
    try:
        for rows, tokens, lengths in _encode_batches(_document_batches(sources, cfg, scan), tok, workers):
            ends = np.cumsum(lengths)
            for j, row in enumerate(rows):
                writers[split[row]].write(tokens[ends[j] - lengths[j]:ends[j]], int(scan.nbytes[row]))
        stats = {w.name: w.close() for w in writers}
    finally:
        for w in writers:
            w.abort()
    total = sum(s["tokens"] for s in stats.values())
    seconds = time.perf_counter() - t0
    log(f"tokenized {len(scan.source)} documents ({scan.nbytes.sum() / 1e6:.2f} MB) into {total:,} "
        f"tokens in {seconds:.1f}s with {workers} worker(s) ({scan.nbytes.sum() / 1e6 / max(seconds, 1e-9):.2f} MB/s)")
    return stats


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _build(folder: Path, cfg: DataConfig, key: str, sources: Sequence[SourceFile],
           user_tokenizer: LMTokenizer | None, workers: int, log: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    log(f"reading {len(sources)} source file(s)")
    scan = _scan(sources, cfg)
    n_docs = len(scan.source)
    if n_docs == 0:
        raise CorpusError(f"the corpus ({len(sources)} file(s), first {sources[0].path}) holds no "
                          "non-empty document")
    split = assign_splits(scan.u, cfg.split_fractions)
    counts = np.bincount(split, minlength=3)
    log(f"{n_docs} documents, {scan.nbytes.sum() / 1e6:.2f} MB: train/val/test = "
        f"{counts[0]}/{counts[1]}/{counts[2]} documents")
    tok = user_tokenizer or _train_tokenizer(sources, cfg, scan, split, log)
    tok.save(folder / TOKENIZER_FILE)
    stats = _tokenize_documents(folder, sources, cfg, scan, split, tok, workers, log)
    manifest = {
        "format_version": FORMAT_VERSION,
        "settings_key": key,
        "settings": cfg.cache_settings(),
        "corpus": cfg.corpus_label,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "source": tok.source,
                      "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "eot_id": tok.eot_id,
                      "pad_token": tok.pad_token, "pad_id": tok.pad_id},
        "vocab_size": tok.vocab_size,
        "dtype": tok.dtype.name,
        "split_fractions": dict(zip(SPLITS, cfg.split_fractions)),
        "seed": cfg.seed,
        "splits": stats,
        "sources": [s.to_dict() for s in sources],
        "build_seconds": round(time.perf_counter() - t0, 3),
        "created_unix": time.time(),
    }
    # The manifest goes last: a folder with a manifest was written completely.
    _write_json(folder / MANIFEST, manifest)


def _source_changes(old: Sequence[Mapping[str, Any]], new: Sequence[SourceFile]) -> str | None:
    """A sentence saying how the corpus files changed since the manifest, or None."""
    before = {s["path"]: (s["size"], s["mtime_ns"]) for s in old}
    after = {s.path: (s.size, s.mtime_ns) for s in new}
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    modified = [p for p in after if p in before and after[p] != before[p]]
    parts = []
    for what, paths in (("modified", modified), ("added", added), ("removed", removed)):
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            parts.append(f"{len(paths)} file(s) {what} ({shown})")
    if not parts and [s["path"] for s in old] != [s.path for s in new]:
        parts.append("the files' order changed")
    return "; ".join(parts) if parts else None


def _check_cache(folder: Path, key: str, sources: Sequence[SourceFile],
                 user_tokenizer: LMTokenizer | None) -> tuple[PreparedData | None, str | None]:
    """(the loaded cache, None) when ``folder`` can be reused, else (None, why not)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"its manifest is missing or unreadable ({e})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"its format version is {manifest.get('format_version')}, this code writes {FORMAT_VERSION}"
    if manifest.get("settings_key") != key:
        return None, f"its settings key {manifest.get('settings_key')} is not {key}"
    changes = _source_changes(manifest.get("sources", []), sources)
    if changes:
        return None, f"the corpus changed: {changes}"
    old_hash = manifest.get("tokenizer", {}).get("sha256", "")
    if user_tokenizer is not None and user_tokenizer.sha256 != old_hash:
        return None, (f"the tokenizer {user_tokenizer.source} changed (sha256 {old_hash[:12]} -> "
                      f"{user_tokenizer.sha256[:12]})")
    try:
        return PreparedData.load(folder), None
    except (OSError, ValueError, KeyError) as e:
        return None, f"its files are damaged ({e})"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on ``path`` (POSIX flock); yields whether locking is available."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, and no clean-up of others' leftovers
        yield False
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prepare(config: DataConfig | Mapping[str, Any] | None = None, verbose: bool = True) -> PreparedData:
    """Build (or reuse) the tokenized splits of a corpus; returns a :class:`PreparedData`.

    ``config`` is a :class:`DataConfig`, a dict or a Hydra ``DictConfig`` of its fields (None: all
    defaults, the python-docs corpus). Safe to call from every DDP rank: a file lock makes the others
    wait and then reuse the first one's cache. Prints what it does (reuse, or why it rebuilds) unless
    ``verbose`` is False.
    """
    cfg = DataConfig.coerce(config)
    log = _log_fn(verbose)
    sources = resolve_sources(None if cfg.paths else cfg.corpus, cfg.paths)
    user_tokenizer = LMTokenizer.load(cfg.tokenizer, cfg.eot_token, cfg.pad_token) if cfg.tokenizer else None
    key = settings_key(cfg.cache_settings())
    root = Path(cfg.cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{cfg.corpus_label}-{key}"
    with _exclusive_lock(root / f".{final.name}.lock") as locked:
        if final.exists():
            data, reason = _check_cache(final, key, sources, user_tokenizer)
            if data is not None:
                log(f"reusing {final} ({data.describe()})")
                data.seq_len = cfg.seq_len
                return data
            log(f"rebuilding {final}: {reason}")
        if locked:  # only we may be building this key: what a killed run left behind can go
            for leftover in root.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            for leftover in root.glob(f".{final.name}.stale-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _build(tmp, cfg, key, sources, user_tokenizer, cfg.workers or default_workers(), log)
            replace_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    data = PreparedData.load(final, seq_len=cfg.seq_len)
    log(f"wrote {final} ({data.describe()})")
    return data


# ------------------------------------------------------------------------------------------------
# Reading a cache folder


@dataclass(frozen=True)
class SplitInfo:
    """A split's sizes: ``tokens`` (with separators), ``documents``, ``bytes`` (UTF-8 of the texts)."""

    name: str
    tokens: int
    documents: int
    bytes: int

    @property
    def targets(self) -> int:
        """Tokens a sequential pass predicts: all but the first."""
        return max(self.tokens - 1, 0)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.targets if self.targets else float("nan")


class TokenShard:
    """A split's packed token ids, opened lazily as a read-only numpy memmap.

    Picklable without its data: a DataLoader worker (fork or spawn) reopens the file instead of
    receiving a copy of the tokens. ``TokenShard.from_array`` wraps in-memory ids (tests, tools).
    """

    def __init__(self, path: str | os.PathLike | None, dtype: np.dtype | str, num_tokens: int,
                 split: str = "train", array_: np.ndarray | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = int(num_tokens)
        self.split = split
        self._array = array_

    @classmethod
    def from_array(cls, tokens: np.ndarray, split: str = "train") -> TokenShard:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        return cls(None, tokens.dtype, len(tokens), split, tokens)

    @property
    def array(self) -> np.ndarray:
        """The ids, [num_tokens] of ``dtype`` (a memmap for files)."""
        if self._array is None:
            if self.num_tokens == 0:  # numpy cannot map an empty file
                self._array = np.zeros(0, self.dtype)
            else:
                self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._array

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state


def _as_shard(tokens: TokenShard | np.ndarray, split: str) -> TokenShard:
    return tokens if isinstance(tokens, TokenShard) else TokenShard.from_array(tokens, split)


def check_window(shard: TokenShard, seq_len: int) -> None:
    """Raise a clear error when ``shard`` holds fewer than one window (``seq_len + 1`` tokens)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(shard) < seq_len + 1:
        extra = (" (raise data.val_fraction / data.test_fraction to give it more documents)"
                 if shard.split in ("val", "test") else "")
        raise ValueError(
            f"The {shard.split} split has {len(shard)} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1} tokens. Fix: a smaller data.seq_len (at most {max(len(shard) - 1, 0)} for "
            f"this split), or more data{extra}."
        )


def _window(array_: np.ndarray, start: int, length: int) -> np.ndarray:
    return np.asarray(array_[start:start + length], dtype=np.int64)


class RandomWindowDataset(Dataset):
    """``num_samples`` training windows at seeded random positions of a shard.

    Item ``i`` is a window of ``seq_len + 1`` tokens starting at a uniform position drawn from
    ``(seed, i)`` alone, so the dataset is the same in every DataLoader worker and rank, and resuming
    at item ``i`` needs no RNG state. Returns ``{"input_ids": int64 [seq_len], "labels": int64
    [seq_len]}`` with ``labels[t] = input_ids[t + 1]`` of the window (the model does not shift).
    ``num_samples`` defaults to the number of non-overlapping windows in the shard (one "epoch").
    """

    def __init__(self, tokens: TokenShard | np.ndarray, seq_len: int, num_samples: int | None = None,
                 seed: int = 0, split: str = "train") -> None:
        self.shard = _as_shard(tokens, split)
        check_window(self.shard, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self.num_samples = (len(self.shard) - 1) // seq_len if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def start(self, index: int) -> int:
        """First token position of window ``index``, uniform in [0, tokens - seq_len - 1]."""
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(0, len(self.shard) - self.seq_len))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} windows")
        w = torch.from_numpy(_window(self.shard.array, self.start(index), self.seq_len + 1))
        return {"input_ids": w[:-1], "labels": w[1:]}


class SequentialWindowDataset(Dataset):
    """Non-overlapping windows, in order: window ``i`` starts at ``i * seq_len``.

    Each window holds ``seq_len + 1`` tokens; consecutive windows share one token, so their labels
    cover the targets ``tokens[1:]`` exactly once. With ``drop_last=False`` (evaluation) the final,
    partial window is kept: inputs padded with ``pad_id`` and labels with -100, so a pass covers the
    whole split (weight per-window losses by ``(labels != -100).sum()``; :attr:`num_targets` is the
    total). ``drop_last=True`` (sequential training) keeps full windows only. Items as
    :class:`RandomWindowDataset`'s.
    """

    def __init__(self, tokens: TokenShard | np.ndarray, seq_len: int, pad_id: int = 0,
                 drop_last: bool = False, split: str = "val") -> None:
        self.shard = _as_shard(tokens, split)
        check_window(self.shard, seq_len)
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.drop_last = drop_last
        targets = len(self.shard) - 1
        self.num_windows = targets // seq_len if drop_last else -(-targets // seq_len)
        self.num_targets = self.num_windows * seq_len if drop_last else targets

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"index {index} out of range for {self.num_windows} windows")
        L = self.seq_len
        w = _window(self.shard.array, index * L, L + 1)
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        n = len(w) - 1  # targets in this window (L except in the last, partial one)
        input_ids[:n] = w[:-1]
        labels[:n] = w[1:]
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


# ------------------------------------------------------------------------------------------------
# Baselines and metrics


@dataclass(frozen=True)
class UnigramBaseline:
    """A unigram model of the train tokens, scored on an evaluation split's targets.

    cross_entropy: nats per target token of the eval split under the (add-``smoothing``) train unigram.
    perplexity:    exp(cross_entropy): what "val ppl X vs unigram Y" compares against.
    train_entropy: nats, entropy of the (unsmoothed) train unigram distribution itself.
    bits_per_byte: cross_entropy in bits per UTF-8 byte of the eval split (None without its bytes).
    """

    eval_split: str
    cross_entropy: float
    perplexity: float
    train_entropy: float
    bits_per_byte: float | None
    smoothing: float


def _token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """float64 [vocab_size] occurrence counts, in chunks (a memmap is never read whole into int64)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int,
                     eval_bytes: int | None = None, smoothing: float = 1.0,
                     eval_split: str = "val") -> UnigramBaseline:
    """Score the train split's unigram distribution on ``eval_tokens[1:]`` (a sequential pass's targets).

    p(t) = (count_train(t) + smoothing) / (N_train + smoothing * vocab_size), so tokens absent from
    train keep a finite loss. ``bits_per_byte`` uses the same targets-over-bytes ratio as
    :meth:`PreparedData.bits_per_byte`.
    """
    if len(train_tokens) == 0:
        raise ValueError("the train split is empty: no unigram distribution to estimate")
    if len(eval_tokens) < 2:
        raise ValueError(f"the {eval_split} split has {len(eval_tokens)} tokens: nothing to score a "
                         f"unigram baseline on (raise data.{eval_split}_fraction or add documents)")
    counts = _token_counts(train_tokens, vocab_size)
    log_p = np.log(counts + smoothing) - math.log(counts.sum() + smoothing * vocab_size)
    eval_counts = _token_counts(eval_tokens[1:], vocab_size)
    n_targets = eval_counts.sum()
    cross_entropy = float(-(eval_counts * log_p).sum() / n_targets)
    q = counts[counts > 0] / counts.sum()
    train_entropy = float(-(q * np.log(q)).sum())
    bpb = cross_entropy * n_targets / (eval_bytes * math.log(2)) if eval_bytes else None
    return UnigramBaseline(eval_split, cross_entropy, math.exp(cross_entropy), train_entropy, bpb,
                           smoothing)


# ------------------------------------------------------------------------------------------------
# The prepared data


@dataclass
class PreparedData:
    """A complete cache folder: manifest, tokenizer, shards; and the datasets built on them.

    Attributes: ``path`` (the folder), ``manifest`` (its JSON), ``tokenizer``, ``splits`` (name ->
    :class:`SplitInfo`), ``vocab_size``, ``dtype``, ``eot_id``, ``pad_id``, ``seq_len`` (default window
    length of the dataset methods; ``data.seq_len`` when built by :func:`prepare`).
    """

    path: Path
    manifest: dict[str, Any]
    tokenizer: LMTokenizer
    seq_len: int | None = None
    splits: dict[str, SplitInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.splits = {name: SplitInfo(name, int(s["tokens"]), int(s["documents"]), int(s["bytes"]))
                       for name, s in self.manifest["splits"].items()}

    @classmethod
    def load(cls, path: str | os.PathLike, seq_len: int | None = None) -> PreparedData:
        """Open a cache folder written by :func:`prepare`; checks the files against the manifest."""
        folder = Path(path)
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        tok_info = manifest["tokenizer"]
        tok = LMTokenizer.load(folder / tok_info["file"], tok_info["eot_token"], tok_info["pad_token"])
        if tok.sha256 != tok_info["sha256"]:
            raise ValueError(f"{folder / tok_info['file']} has sha256 {tok.sha256[:12]}, the manifest "
                             f"says {tok_info['sha256'][:12]}")
        itemsize = _DISK_DTYPES[manifest["dtype"]].itemsize
        for name, s in manifest["splits"].items():
            size = (folder / s["file"]).stat().st_size
            if size != s["tokens"] * itemsize:
                raise ValueError(f"{folder / s['file']} has {size} bytes, the manifest says "
                                 f"{s['tokens']} tokens of {itemsize} bytes")
        return cls(folder, manifest, tok, seq_len)

    # -- facts ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return _DISK_DTYPES[self.manifest["dtype"]]

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"unknown split {split!r}; splits: {list(self.manifest['splits'])}")
        return self.manifest["splits"][split]

    def shard(self, split: str) -> TokenShard:
        s = self._split(split)
        return TokenShard(self.path / s["file"], self.dtype, s["tokens"], split)

    def tokens(self, split: str) -> np.ndarray:
        """The split's packed ids, a read-only memmap [tokens] of :attr:`dtype`."""
        return self.shard(split).array

    def doc_offsets(self, split: str) -> np.ndarray:
        """int64 [documents + 1]: document i is ``tokens[offsets[i]:offsets[i + 1]]`` (EOT first)."""
        return np.load(self.path / self._split(split)["doc_offsets_file"])

    def document_tokens(self, split: str, i: int) -> np.ndarray:
        """Token ids of document ``i`` of ``split`` without its separator."""
        offsets = self.doc_offsets(split)
        return np.asarray(self.tokens(split)[offsets[i] + 1:offsets[i + 1]])

    def describe(self) -> str:
        parts = [f"{name} {s.tokens:,} tokens / {s.documents} docs" for name, s in self.splits.items()]
        return f"vocab {self.vocab_size}, {self.manifest['dtype']}; " + ", ".join(parts)

    # -- datasets ---------------------------------------------------------------------------------

    def _seq_len(self, seq_len: int | None) -> int:
        if seq_len is not None:
            return seq_len
        if self.seq_len is None:
            raise ValueError("seq_len is not set: pass seq_len=... (or load through prepare(), which "
                             "uses data.seq_len)")
        return self.seq_len

    def train_dataset(self, seq_len: int | None = None, num_samples: int | None = None, seed: int = 0,
                      mode: str = "random") -> Dataset:
        """Training windows of the train split: ``mode="random"`` (:class:`RandomWindowDataset`,
        ``num_samples`` seeded windows) or ``"sequential"`` (full non-overlapping windows in order)."""
        L = self._seq_len(seq_len)
        if mode == "random":
            return RandomWindowDataset(self.shard("train"), L, num_samples, seed, "train")
        if mode == "sequential":
            return SequentialWindowDataset(self.shard("train"), L, self.pad_id, drop_last=True, split="train")
        raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")

    def eval_dataset(self, split: str = "val", seq_len: int | None = None) -> SequentialWindowDataset:
        """Non-overlapping windows covering ``split`` (last one padded, labels -100)."""
        return SequentialWindowDataset(self.shard(split), self._seq_len(seq_len), self.pad_id,
                                       drop_last=False, split=split)

    # -- metrics ----------------------------------------------------------------------------------

    def bits_per_byte(self, mean_loss_nats: float, split: str = "val") -> float:
        """Bits per UTF-8 byte of ``split`` from the mean cross-entropy (nats/token) of a pass over it."""
        info = self.splits[split]
        if info.bytes == 0 or info.targets == 0:
            raise ValueError(f"the {split} split is empty: no bits per byte")
        return float(mean_loss_nats) * info.targets / (info.bytes * math.log(2))

    def unigram_baseline(self, eval_split: str = "val", smoothing: float = 1.0) -> UnigramBaseline:
        """The train unigram's cross-entropy / perplexity / bits per byte on ``eval_split``."""
        return unigram_baseline(self.tokens("train"), self.tokens(eval_split), self.vocab_size,
                                self.splits[eval_split].bytes, smoothing, eval_split)


__all__ = [
    "DataConfig", "PreparedData", "RandomWindowDataset", "SequentialWindowDataset", "SplitInfo",
    "TokenShard", "UnigramBaseline", "assign_splits", "check_window", "default_workers", "prepare",
    "settings_key", "unigram_baseline",
]
