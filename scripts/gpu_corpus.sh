#!/usr/bin/env bash
# The GPU runs' language corpus, built on the GPU machine itself under /tmp/corpus (nothing downloaded):
# the python3.11-doc reStructuredText sources (carried as .corpus/python-docs.tar.xz, made by
# `tar cJf .corpus/python-docs.tar.xz -C /usr/share/doc/python3.11/html _sources`) plus the running
# interpreter's standard library (the python-stdlib corpus's rule: no tests, site-packages, codec tables);
# CORPUS_SITE_PACKAGES=1 adds the installed packages' Python sources, CORPUS_MAX_MB caps the total (400).
#
#   bash scripts/gpu_corpus.sh     # then: data=files 'data.paths=[/tmp/corpus]'
set -euo pipefail
mkdir -p /tmp/corpus/docs
if [ -f .corpus/python-docs.tar.xz ]; then tar xJf .corpus/python-docs.tar.xz -C /tmp/corpus/docs; fi
python3 - <<'PY'
# The stdlib by the python-stdlib corpus's rule; with CORPUS_SITE_PACKAGES=1 also the installed packages'
# Python sources (torch, transformers, numpy, ...: a much larger code corpus, so that a 130M model sees
# unique tokens instead of several epochs), capped at CORPUS_MAX_MB.
import os, shutil, sysconfig
from pathlib import Path
from domains.lm.corpus import _STDLIB_EXCLUDED_DIRS
cap = float(os.environ.get("CORPUS_MAX_MB", "400")) * 1e6
roots = [("stdlib", Path(sysconfig.get_path("stdlib")))]
if os.environ.get("CORPUS_SITE_PACKAGES") == "1":
    for key in ("purelib", "platlib"):
        root = Path(sysconfig.get_path(key))
        if root.is_dir() and all(root != r for _, r in roots):
            roots.append((f"site-{key}", root))
total, n = 0, 0
for name, root in roots:
    skip = _STDLIB_EXCLUDED_DIRS - ({"site-packages", "dist-packages"} if name != "stdlib" else set())
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if any(p in skip or p.startswith(".") for p in rel.parts[:-1]) or rel.name.startswith(("config-", "_sysconfigdata")):
            continue
        size = f.stat().st_size
        if size == 0 or size > 2_000_000 or total + size > cap:
            continue
        dest = Path("/tmp/corpus") / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        total += size
        n += 1
print(f"corpus: {n} python files, {total / 1e6:.0f} MB from {[str(r) for _, r in roots]}")
PY
