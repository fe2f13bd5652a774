"""Corpus discovery and reading: files, folders, globs, jsonl, parquet, gzip, awkward files, named corpora."""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
import warnings
from pathlib import Path

import pytest

from domains.lm import corpus
from domains.lm.corpus import (
    CorpusError, CorpusWarning, document_key, find_sources, iter_documents, named_corpus_sources,
    resolve_sources, source_kind,
)


def _texts(sources, **kw):
    return [d.text for d in iter_documents(sources, **kw)]


def test_folder_is_walked_recursively_in_sorted_order_without_hidden_entries(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "x.rst").write_text("ex")
    (tmp_path / "sub" / "deeper" / "y.py").write_text("why = 1\n")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "config").write_text("[core]")
    (tmp_path / "__pycache__" / "m.pyc").write_bytes(b"\x00\x01")

    sources = find_sources([tmp_path])
    assert [s.key for s in sources] == ["a.txt", "b.txt", "sub/x.rst", "sub/deeper/y.py"]
    assert all(s.kind == "text" and os.path.isabs(s.path) for s in sources)
    assert sources[0].size == 2 and sources[0].mtime_ns == (tmp_path / "a.txt").stat().st_mtime_ns
    docs = list(iter_documents(sources))
    assert [d.text for d in docs] == ["ay", "bee", "ex", "why = 1\n"]
    assert [d.source for d in docs] == [0, 1, 2, 3] and all(d.index == 0 for d in docs)
    assert document_key(sources[2], docs[2]) == "sub/x.rst:0"


def test_single_file_key_is_its_name_and_duplicates_are_dropped(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("hello")
    sources = find_sources([str(f), tmp_path, str(tmp_path / "*.txt")])
    assert len(sources) == 1 and sources[0].key == "one.txt"
    assert find_sources(str(f))[0].path == str(f)  # a bare string is one path, not characters


def test_globs_recursive_with_keys_relative_to_the_glob_prefix(tmp_path):
    for rel in ("x/1.txt", "x/y/2.txt", "x/y/3.md", "z/4.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    sources = find_sources([str(tmp_path / "x" / "**" / "*.txt")])
    assert [s.key for s in sources] == ["1.txt", "y/2.txt"]
    assert _texts(sources) == ["x/1.txt", "x/y/2.txt"]
    # A glob that matches a folder takes the folder's files.
    assert [s.key for s in find_sources([str(tmp_path / "[xz]")])] == ["x/1.txt", "x/y/2.txt",
                                                                      "x/y/3.md", "z/4.txt"]
    with pytest.raises(CorpusError, match=r"glob .*nothing\*\.txt.* matches no file"):
        find_sources([str(tmp_path / "nothing*.txt")])


def test_missing_path_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(CorpusError, match="such.txt.*does not exist"):
        find_sources([str(missing)])
    with pytest.raises(CorpusError, match="empty"):
        find_sources([])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        find_sources([tmp_path / "emptydir"])


def test_jsonl_one_document_per_line_with_configurable_field(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": ""}),
             json.dumps({"text": "third ünïcode", "id": 3}), "   "]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src,) = find_sources([f])
    assert src.kind == "jsonl"
    with pytest.warns(CorpusWarning, match="skipped 1 empty"):
        docs = list(iter_documents([src]))
    assert [(d.index, d.text) for d in docs] == [(0, "first doc"), (3, "third ünïcode")]

    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"body": "in body"}) + "\n")
    assert _texts(find_sources([g]), text_field="body") == ["in body"]
    with pytest.raises(CorpusError, match=r"e.jsonl:1: no text field 'text'.*\['body'\].*data.text_field"):
        list(iter_documents(find_sources([g])))
    h = tmp_path / "bad.jsonl"
    h.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not a JSON record"):
        list(iter_documents(find_sources([h])))
    k = tmp_path / "num.jsonl"
    k.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="is a int, expected a string"):
        list(iter_documents(find_sources([k])))


def test_gzip_is_transparent_for_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("compressed text ✓")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "line one"}) + "\n" + json.dumps({"text": "line two"}) + "\n")
    sources = find_sources([tmp_path])
    assert [s.kind for s in sources] == ["text", "jsonl"]
    assert _texts(sources) == ["compressed text ✓", "line one", "line two"]
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CorpusError, match="broken.txt.gz: cannot be read"):
        list(iter_documents(find_sources([tmp_path / "broken.txt.gz"])))


def test_parquet_rows_or_a_clear_error_without_pyarrow(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        f = tmp_path / "d.parquet"
        f.write_bytes(b"PAR1 not really")
        with pytest.raises(CorpusError, match=r"d.parquet.*pyarrow.*pip install pyarrow"):
            list(iter_documents(find_sources([f])))
        return
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["row zero", None, "", "row three"]}), f)
    with pytest.warns(CorpusWarning, match="skipped 2 empty"):
        docs = list(iter_documents(find_sources([f]), text_field="content"))
    assert [(d.index, d.text) for d in docs] == [(0, "row zero"), (3, "row three")]
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents(find_sources([f])))


def test_empty_files_are_skipped_with_a_warning(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with gzip.open(tmp_path / "empty2.txt.gz", "wb"):
        pass
    (tmp_path / "full.txt").write_text("content")
    with pytest.warns(CorpusWarning, match="skipping empty file") as record:
        assert _texts(find_sources([tmp_path])) == ["content"]
    assert sum("empty" in str(w.message) for w in record) == 2


def test_binary_files_are_errors_naming_the_file_unless_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("good text")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    sources = find_sources([tmp_path])
    with pytest.raises(CorpusError, match=r"image.png looks binary.*NUL.*data.skip_binary=true"):
        list(iter_documents(sources))
    with pytest.warns(CorpusWarning, match="skipping binary file .*image.png"):
        assert _texts(sources, skip_binary=True) == ["good text"]

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt looks binary.*not UTF-8"):
        list(iter_documents(find_sources([latin1])))


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert _texts(find_sources([tmp_path])) == ["hello"]


def test_source_kind():
    assert source_kind("x/y.jsonl") == "jsonl" and source_kind("y.NDJSON.gz") == "jsonl"
    assert source_kind("t.parquet") == "parquet"
    assert source_kind("a.txt.gz") == "text" and source_kind("setup.py") == "text"


def test_user_paths_replace_the_named_corpus(tmp_path):
    (tmp_path / "t.txt").write_text("mine")
    assert [s.key for s in resolve_sources("python-docs", [tmp_path])] == ["t.txt"]
    with pytest.raises(CorpusError, match="Unknown corpus 'nope'.*python-docs, python-stdlib"):
        resolve_sources("nope", None)


@pytest.mark.skipif(not os.path.isdir("/usr/share/doc/python3.11/html/_sources"),
                    reason="python3.11-doc is not installed (apt-get install python3.11-doc)")
def test_python_docs_corpus_is_discovered():
    sources = named_corpus_sources("python-docs")
    assert len(sources) > 400
    total = sum(s.size for s in sources)
    assert 5e6 < total < 5e7, total
    keys = {s.key for s in sources}
    assert "library/functions.rst.txt" in keys and "tutorial/index.rst.txt" in keys
    functions = next(s for s in sources if s.key == "library/functions.rst.txt")
    (doc,) = iter_documents([functions])
    assert "Built-in Functions" in doc.text and len(doc.text) > 50_000


def test_python_docs_missing_names_the_package_and_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "PYTHON_DOCS_DIRS", (str(tmp_path / "nothing"),))
    monkeypatch.setattr(corpus, "PYTHON_DOCS_GLOB", str(tmp_path / "nothing*"))
    with pytest.raises(CorpusError) as info:
        named_corpus_sources("python-docs")
    message = str(info.value)
    assert "apt-get install python3.11-doc" in message
    assert "data.corpus=python-stdlib" in message and "data.paths=[...]" in message


def test_python_stdlib_corpus_is_library_source_only():
    sources = named_corpus_sources("python-stdlib")
    root = Path(sysconfig.get_path("stdlib"))
    keys = [s.key for s in sources]
    assert len(sources) > 300
    assert {"os.py", "json/__init__.py", "collections/__init__.py", "asyncio/tasks.py"} <= set(keys)
    for key in keys:
        parts = key.split("/")
        assert key.endswith(".py") and not parts[-1].startswith(".")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"} & set(parts), key
    assert all(Path(s.path).is_relative_to(root) and s.size > 0 for s in sources)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty or binary file among them
        docs = list(iter_documents(sources[:60]))
    assert len(docs) == 60 and any("def " in d.text for d in docs)
