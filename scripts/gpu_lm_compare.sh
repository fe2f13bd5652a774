#!/usr/bin/env bash
# 130M presets at equal tokens on one GPU, on a corpus found on the GPU machine itself, with loss curves.
#
#   bash scripts/gpu_lm_compare.sh [STEPS] [PRESET ...]      # defaults: 800 steps, hybrid-130m transformer++-125m
#
# Corpus: the python3.11-doc reStructuredText sources (carried as .corpus/python-docs.tar.xz, made by
# `tar cJf .corpus/python-docs.tar.xz -C /usr/share/doc/python3.11/html _sources`) plus the running
# interpreter's standard library (the python-stdlib corpus's rule: no tests, site-packages, codec tables),
# copied under /tmp/corpus (CORPUS_SITE_PACKAGES=1 adds the installed packages' sources); BPE 16384. Every preset: batch 16 x 2048 tokens, lr 1e-3,
# 200 warm-up steps, cosine, bf16. EXTRA='key=value ...' appends overrides (a CPU smoke: EXTRA='trainer=cpu ...'), DATA_EXTRA='...' to the data config. Writes the table, the CSV logs and the PNG under $OUT (or ./gpu_out).
set -euo pipefail
steps=${1:-800}; shift || true
presets=("$@"); [ ${#presets[@]} -gt 0 ] || presets=(hybrid-130m transformer++-125m)
out=${OUT:-gpu_out}; mkdir -p "$out"
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
data=(data=files "data.paths=[/tmp/corpus]" data.vocab_size=16384 data.workers=16 ${DATA_EXTRA:-})
common=("${data[@]}" trainer=gpu seq_len=2048 batch_size=16 optim.lr=1e-3 optim.warmup_steps=200
        trainer.val_check_interval=100 trainer.limit_val_batches=16 trainer.log_every_n_steps=10
        trainer.tensorboard=false ${EXTRA:-})
python3 -m domains.lm prepare "${data[@]}"
python3 scripts/compare_lm_presets.py --steps "$steps" --presets "${presets[@]}" -- "${common[@]}" | tee "$out/table.md"
runs=(); for p in "${presets[@]}"; do runs+=("runs/lm/compare-$p"); mkdir -p "$out/$p"; cp "runs/lm/compare-$p/config.yaml" "runs/lm/compare-$p/logs/metrics.csv" "$out/$p/"; done
python3 scripts/plot_loss_curves.py "${runs[@]}" --out "$out/loss_curves.png" \
  --title "130M presets, equal tokens, python docs + stdlib (BPE 16K), H100 bf16" | tee -a "$out/table.md"
