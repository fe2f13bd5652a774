"""Finding and reading the documents of a language-model corpus.

A corpus is a list of source files; a source holds one or more documents:

- a text file (any name not listed below; ``.txt``, ``.rst``, ``.py``, ...) is ONE document;
- a ``.jsonl`` / ``.ndjson`` file holds one document per non-blank line, the string under
  ``text_field`` (default ``"text"``);
- a ``.parquet`` file holds one document per row, the string in column ``text_field`` (read with
  pyarrow, an optional dependency);
- any of them may be gzip-compressed (``name.gz``), decompressed transparently.

Sources are found from user paths (files, folders walked recursively, globs with ``*``, ``?``, ``[``
and ``**``) or from a named corpus that is installed on the machine, so nothing is downloaded:

- ``python-docs`` (the default): the reStructuredText sources of the Python documentation shipped by
  Debian/Ubuntu's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``, ~500 files,
  ~11 MB of English prose with code samples);
- ``python-stdlib``: the running interpreter's standard-library source (``sysconfig``'s stdlib path,
  ``*.py``, without the test suites, site-packages and generated tables): a code corpus that is
  always present.

Policy for awkward inputs (tests cover each):

- a path that does not exist, or a glob that matches nothing, is an error naming it;
- an empty document (an empty file, an empty jsonl text, an empty/None parquet value) is skipped with a
  :class:`CorpusWarning`;
- a binary text source (a NUL byte, or bytes that are not UTF-8) is an error naming the file and the
  fix, because a folder that silently loses files (or feeds image bytes to the tokenizer) is worse
  than a stopped run; with ``skip_binary=True`` such files are skipped with a warning instead;
- in folders, hidden entries (``.git``, ``.DS_Store``) and ``__pycache__`` are not walked.

Every document has a stable key, ``"<source key>:<index>"``, where the source key is the file's path
relative to the folder (or glob prefix) it was found under and the index is its line / row number
(0 for a whole-file document). The data pipeline hashes that key to pick the document's split, so
splits do not move when the corpus folder moves or when other documents are added.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOCS = "python-docs"
PYTHON_STDLIB = "python-stdlib"
NAMED_CORPORA = (PYTHON_DOCS, PYTHON_STDLIB)

# Candidate folders of the python3.X-doc package, the running interpreter's version first.
PYTHON_DOCS_DIRS = (
    f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources",
    "/usr/share/doc/python3.11/html/_sources",
    "/usr/share/doc/python3/html/_sources",
)
PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"  # any other python3.X-doc, as a last resort
PYTHON_DOCS_PACKAGE = "python3.11-doc"

# Folders of the standard library that are not "library source": test suites (large, full of
# deliberately odd or non-UTF-8 files), installed third-party packages, caches, generated codec tables
# (encodings/cp*.py are mostly hex) and pydoc's generated copy of the documentation.
_STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
    "pydoc_data", "lib-dynload",
})

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = "*?["


class CorpusError(ValueError):
    """A corpus that cannot be read: missing path or package, binary file, malformed record."""


class CorpusWarning(UserWarning):
    """Something in the corpus was skipped (empty document, binary file with ``skip_binary``)."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus.

    path:     absolute path.
    key:      stable name for split assignment: the path relative to the folder or glob prefix it was
              found under (the file name for a file given directly), with ``/`` separators.
    kind:     ``"text"`` (one document), ``"jsonl"`` (one per line) or ``"parquet"`` (one per row).
    size:     bytes on disk (compressed size for ``.gz``).
    mtime_ns: modification time in nanoseconds; with ``size``, what cache matching compares.
    """

    path: str
    key: str
    kind: str
    size: int
    mtime_ns: int

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")

    def to_dict(self) -> dict:
        return {"path": self.path, "key": self.key, "kind": self.kind, "size": self.size,
                "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Document:
    """One document: ``text`` (non-empty str), from ``sources[source]``, line/row ``index`` in it."""

    source: int
    index: int
    text: str


# ------------------------------------------------------------------------------------------------
# Finding sources


def source_kind(path: str | os.PathLike) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"`` from the file name (a ``.gz`` suffix is looked through)."""
    name = os.fspath(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _source(path: Path, key: str) -> SourceFile:
    st = path.stat()
    return SourceFile(path=str(path.absolute()), key=key, kind=source_kind(path), size=st.st_size,
                      mtime_ns=st.st_mtime_ns)


def _walk(root: Path, suffixes: tuple[str, ...] | None = None,
          excluded_dirs: frozenset[str] = frozenset(), excluded_prefixes: tuple[str, ...] = ()
          ) -> Iterator[Path]:
    """Files under ``root`` in sorted (deterministic) order, without hidden entries and ``__pycache__``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                             and d not in excluded_dirs and not d.startswith(excluded_prefixes))
        for name in sorted(filenames):
            if name.startswith(".") or name.startswith(excluded_prefixes):
                continue
            if suffixes is not None and not name.endswith(suffixes):
                continue
            yield Path(dirpath) / name


def _glob_root(pattern: str) -> Path:
    """The longest leading folder of ``pattern`` without glob characters (what keys are relative to)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_sources(paths: Sequence[str | os.PathLike]) -> list[SourceFile]:
    """The source files named by ``paths``: files, folders (recursive) and globs, in the given order.

    Within a folder or glob, files are sorted. A file reached twice (through two paths) is kept once.
    Raises :class:`CorpusError` for a path that does not exist or a glob that matches no file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CorpusError("data.paths is empty: give at least one file, folder or glob, "
                          f"or use a named corpus ({', '.join(NAMED_CORPORA)})")
    sources: list[SourceFile] = []
    seen: set[str] = set()

    def add(file: Path, root: Path) -> None:
        real = os.path.realpath(file)
        if real in seen:
            return
        seen.add(real)
        key = file.name if root == file else file.relative_to(root).as_posix()
        sources.append(_source(file, key))

    for raw in paths:
        text = os.path.expanduser(os.fspath(raw))
        if any(c in text for c in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            files = [Path(m) for m in matches if os.path.isfile(m)]
            root = _glob_root(text)
            for m in matches:  # a glob that matches folders takes everything in them
                if os.path.isdir(m):
                    files.extend(_walk(Path(m)))
            if not files:
                raise CorpusError(f"data.paths: the glob {text!r} matches no file")
            for f in files:
                add(f, root)
        else:
            p = Path(text)
            if not p.exists():
                raise CorpusError(f"data.paths: {text!r} does not exist (resolved to {p.absolute()})")
            if p.is_dir():
                files = list(_walk(p))
                if not files:
                    raise CorpusError(f"data.paths: the folder {text!r} holds no (non-hidden) file")
                for f in files:
                    add(f, p)
            else:
                add(p, p)
    return sources


def python_docs_root() -> Path:
    """The folder of the Python documentation's reStructuredText sources (package python3.11-doc)."""
    for candidate in PYTHON_DOCS_DIRS:
        if os.path.isdir(candidate):
            return Path(candidate)
    others = sorted(glob.glob(PYTHON_DOCS_GLOB), reverse=True)
    if others:  # another python3.X-doc: the same kind of text
        return Path(others[0])
    raise CorpusError(
        f"The corpus {PYTHON_DOCS!r} (the default) reads the Python documentation sources installed by "
        f"the Debian/Ubuntu package {PYTHON_DOCS_PACKAGE}, which is not installed (looked in "
        f"{', '.join(PYTHON_DOCS_DIRS)}). Fix: `apt-get install {PYTHON_DOCS_PACKAGE}`; or use the "
        f"standard-library code corpus that is always present (data.corpus={PYTHON_STDLIB}); or your "
        f"own text with data.paths=[...] (files, folders, globs, .jsonl, .parquet, .gz)."
    )


def python_stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_path("stdlib")``)."""
    root = Path(sysconfig.get_path("stdlib"))
    if not root.is_dir():
        raise CorpusError(f"The corpus {PYTHON_STDLIB!r}: the standard-library folder {root} does not "
                          "exist (sysconfig.get_path('stdlib')); use data.paths=[...] instead")
    return root


def named_corpus_sources(name: str) -> list[SourceFile]:
    """The source files of a named corpus (``python-docs`` or ``python-stdlib``)."""
    if name == PYTHON_DOCS:
        root = python_docs_root()
        files = list(_walk(root, suffixes=(".txt", ".rst", ".txt.gz", ".rst.gz")))
    elif name == PYTHON_STDLIB:
        root = python_stdlib_root()
        files = list(_walk(root, suffixes=(".py",), excluded_dirs=_STDLIB_EXCLUDED_DIRS,
                           excluded_prefixes=("config-", "_sysconfigdata")))
    else:
        raise CorpusError(f"Unknown corpus {name!r}; named corpora: {', '.join(NAMED_CORPORA)} "
                          "(or give your own files with data.paths=[...])")
    if not files:
        raise CorpusError(f"The corpus {name!r}: no files found under {root}")
    sources = [_source(f, f.relative_to(root).as_posix()) for f in files]
    # Empty files of an installed corpus (the stdlib's bare __init__.py files) are not documents and
    # not worth a warning each.
    return [s for s in sources if s.size > 0]


def resolve_sources(corpus: str | None, paths: Sequence[str | os.PathLike] | None) -> list[SourceFile]:
    """User ``paths`` when given (they replace the named corpus), else the named ``corpus``."""
    if paths:
        return find_sources(paths)
    if corpus is None:
        raise CorpusError(f"No corpus: set data.corpus ({', '.join(NAMED_CORPORA)}) or data.paths=[...]")
    return named_corpus_sources(corpus)


# ------------------------------------------------------------------------------------------------
# Reading documents


def _read_bytes(source: SourceFile) -> bytes:
    try:
        if source.compressed:
            with gzip.open(source.path, "rb") as f:
                return f.read()
        with open(source.path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"{source.path}: cannot be read ({e})") from e


def _decode_text(source: SourceFile, data: bytes, skip_binary: bool, warn: bool) -> str | None:
    """UTF-8 text of a whole-file document; None when it is binary and ``skip_binary`` is set."""
    problem = None
    nul = data.find(b"\x00")
    if nul >= 0:
        problem = f"contains NUL bytes (the first at byte {nul})"
    else:
        try:
            return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
        except UnicodeDecodeError as e:
            problem = f"is not UTF-8 text ({e.reason} at byte {e.start})"
    if skip_binary:
        if warn:
            warnings.warn(f"skipping binary file {source.path}: it {problem}", CorpusWarning,
                          stacklevel=3)
        return None
    raise CorpusError(
        f"{source.path} looks binary: it {problem}. Fix: remove it from the corpus (or narrow the "
        "folder/glob in data.paths), convert it to UTF-8 text, or set data.skip_binary=true to skip "
        "such files with a warning."
    )


def _iter_jsonl(source: SourceFile, text_field: str) -> Iterator[tuple[int, str | None]]:
    opener = gzip.open if source.compressed else open
    try:
        with opener(source.path, "rb") as f:
            for lineno, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CorpusError(f"{source.path}:{lineno + 1}: not a JSON record ({e})") from e
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(
                        f"{source.path}:{lineno + 1}: no text field {text_field!r} (the record has "
                        f"{keys}). Fix: set data.text_field to the name of the text field."
                    )
                text = record[text_field]
                if text is not None and not isinstance(text, str):
                    raise CorpusError(f"{source.path}:{lineno + 1}: field {text_field!r} is a "
                                      f"{type(text).__name__}, expected a string")
                yield lineno, text
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{source.path}: cannot be read ({e})") from e


def _iter_parquet(source: SourceFile, text_field: str) -> Iterator[tuple[int, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"{source.path}: reading .parquet files needs pyarrow, which is not "
                          "installed. Fix: `pip install pyarrow`, or convert the file to .jsonl.") from e
    if source.compressed:
        raise CorpusError(f"{source.path}: gzip around parquet is not supported (parquet compresses "
                          "internally); decompress the file")
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise CorpusError(f"{source.path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{source.path}: no column {text_field!r} (columns: {names}). Fix: set "
                          "data.text_field to the name of the text column.")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{source.path}: row {row}: column {text_field!r} holds "
                                  f"{type(text).__name__}, expected strings")
            yield row, text
            row += 1


def read_source(source: SourceFile, source_index: int = 0, text_field: str = "text",
                skip_binary: bool = False, warn: bool = True) -> Iterator[Document]:
    """The non-empty documents of one source file, in file order (see the module docstring)."""
    if source.kind == "text":
        text = _decode_text(source, _read_bytes(source), skip_binary, warn)
        if text is None:
            return
        if not text:
            if warn:
                warnings.warn(f"skipping empty file {source.path}", CorpusWarning, stacklevel=2)
            return
        yield Document(source_index, 0, text)
        return
    records = _iter_jsonl(source, text_field) if source.kind == "jsonl" else _iter_parquet(source, text_field)
    empty = 0
    for index, text in records:
        if not text:
            empty += 1
            continue
        yield Document(source_index, index, text)
    if empty and warn:
        warnings.warn(f"skipped {empty} empty document(s) in {source.path}", CorpusWarning, stacklevel=2)


def iter_documents(sources: Sequence[SourceFile], text_field: str = "text", skip_binary: bool = False,
                   warn: bool = True) -> Iterator[Document]:
    """Every non-empty document of ``sources``, in source order then file order (deterministic)."""
    for i, source in enumerate(sources):
        yield from read_source(source, i, text_field, skip_binary, warn)


def document_key(source: SourceFile, document: Document) -> str:
    """The stable name of a document that its split is hashed from: ``"<source key>:<index>"``."""
    return f"{source.key}:{document.index}"


__all__ = [
    "NAMED_CORPORA", "PYTHON_DOCS", "PYTHON_STDLIB", "CorpusError", "CorpusWarning", "Document",
    "SourceFile", "document_key", "find_sources", "iter_documents", "named_corpus_sources",
    "python_docs_root", "python_stdlib_root", "read_source", "resolve_sources", "source_kind",
]
