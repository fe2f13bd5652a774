#!/usr/bin/env bash
# 130M presets at equal tokens on one GPU, on a corpus found on the GPU machine itself, with loss curves.
#
#   bash scripts/gpu_lm_compare.sh [STEPS] [PRESET ...]      # defaults: 800 steps, hybrid-130m transformer++-125m
#
# Corpus: scripts/gpu_corpus.sh's (python docs + the GPU machine's stdlib, CORPUS_SITE_PACKAGES=1 adds the
# installed packages' sources); BPE 16384. Every preset: batch 16 x 2048 tokens, lr 1e-3,
# 200 warm-up steps, cosine, bf16. EXTRA='key=value ...' appends overrides (a CPU smoke: EXTRA='trainer=cpu ...'), DATA_EXTRA='...' to the data config. Writes the table, the CSV logs and the PNG under $OUT (or ./gpu_out).
set -euo pipefail
steps=${1:-800}; shift || true
presets=("$@"); [ ${#presets[@]} -gt 0 ] || presets=(hybrid-130m transformer++-125m)
out=${OUT:-gpu_out}; mkdir -p "$out"
bash scripts/gpu_corpus.sh
data=(data=files "data.paths=[/tmp/corpus]" data.vocab_size=16384 data.workers=16 ${DATA_EXTRA:-})
common=("${data[@]}" trainer=gpu seq_len=2048 batch_size=16 optim.lr=1e-3 optim.warmup_steps=200
        trainer.val_check_interval=100 trainer.limit_val_batches=16 trainer.log_every_n_steps=10
        trainer.tensorboard=false ${EXTRA:-})
python3 -m domains.lm prepare "${data[@]}"
python3 scripts/compare_lm_presets.py --steps "$steps" --presets "${presets[@]}" -- "${common[@]}" | tee "$out/table.md"
runs=(); for p in "${presets[@]}"; do runs+=("runs/lm/compare-$p"); mkdir -p "$out/$p"; cp "runs/lm/compare-$p/config.yaml" "runs/lm/compare-$p/logs/metrics.csv" "$out/$p/"; done
python3 scripts/plot_loss_curves.py "${runs[@]}" --out "$out/loss_curves.png" \
  --title "130M presets, equal tokens, python docs + stdlib (BPE 16K), H100 bf16" | tee -a "$out/table.md"
