#!/usr/bin/env bash
# docs/dna.md's GPU results in one time-boxed job on one GPU (the Mamba paper's DNA section, small):
#
#   (a) Mamba-1 vs HyenaDNA at ~1.4M parameters, each pretrained on the human chr22 track at context
#       1K, 8K, 32K and 128K with the same tokens a step (batch = 2^17 / length) and the same steps:
#       test perplexity at the training length against the length (the paper's context-scaling
#       figure), then `eval`'s curve: the same target bases scored after growing contexts;
#   (b) Great Apes species: each pretrained model of context <= 32K fine-tuned on windows of its own
#       length (RC-equivariant head): test accuracy against the window (the paper's Table 13).
#
#   OUT=<results folder> bash scripts/gpu_dna.sh           # the GPU run (BUDGET seconds, default 425)
#   SMOKE=1 bash scripts/gpu_dna.sh                        # CPU, tiny presets, windows of 128/256, 3 steps
#
# Every job runs as a parallel process (16 CPU cores, one GPU) through scripts/gpu_dna.py, which adds a
# wall-clock deadline (training stops there and the job still evaluates and exports) and writes the
# job's result as JSON under runs/gpu_dna/results/. Chains: pretrain -> (eval, finetune) as soon as
# that pretrain is done. Under $OUT, kept current while the jobs run (a kill still returns them):
# progress.log, results.tar.gz (results/, job logs, CSV metrics, configs); at the end report.md,
# summary.json and three PNGs (scripts/gpu_dna.py report).
#
# Measured on the H100 (2026-11-25, docs/dna.md): base cache 14 s; a job's start (imports, Triton
# compiles) ~35 s; with all 8 pretraining jobs sharing the GPU, 64 steps took 36-47 s (HyenaDNA),
# 42 s / 56 s / 95 s / 155 s (Mamba-1 at 1K / 8K / 32K / 128K), peak 1.9-2.7 GiB a HyenaDNA job.
#
# Data: the maffilter-examples alignment, carried in .dna_data/ (the GPU machine has no Debian data
# packages); the base cache is built once, before the jobs start (each job would otherwise build its own).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
START=$(date +%s)
ROOT=${ROOT:-runs/gpu_dna}
OUT=${OUT:-$ROOT/out}
MAF=${DNA_MAF:-.dna_data/Compara.epo_5_catarrhini_hsap-projected.chr22.subset.nogap.cleaned_aln.maf.gz}
CACHE=${DNA_CACHE:-data_cache/dna_gpu}

if [ "$SMOKE" = 1 ]; then
  BUDGET=${BUDGET:-1500}
  TRAINER=cpu; FAMILIES=(mamba1-dna-cpu hyena-dna-cpu); LENGTHS=(128 256); WINDOWS=(128)
  TOKENS=512; STEPS=3; WARMUP=1; EVAL_TOKENS=1024; EVAL_WINDOWS=4; SCORE=32
  FT_STEPS=3; FT_WARMUP=1; PER_CLASS=2; WORKERS=0; NO_CHECKPOINTING=mamba1-dna-cpu-256
else
  BUDGET=${BUDGET:-425}
  TRAINER=gpu; FAMILIES=(mamba1-dna-1.4m hyena-dna-1.4m); LENGTHS=(131072 32768 8192 1024); WINDOWS=(1024 8192 32768)
  TOKENS=131072; STEPS=64; WARMUP=8; EVAL_TOKENS=1048576; EVAL_WINDOWS=64; SCORE=512
  FT_STEPS=100; FT_WARMUP=10; PER_CLASS=64; WORKERS=2
  # The one job on the critical path (latency-bound: 16 scan programs walk 128K positions) keeps its
  # activations; the others recompute them (trainer.activation_checkpointing), so 8 pretraining and up
  # to 14 jobs in all fit in 80 GB.
  NO_CHECKPOINTING=mamba1-dna-1.4m-131072
fi
LR=${LR:-4e-3}; FT_LR=${FT_LR:-1e-3}
PRE_DEADLINE=$((START + BUDGET - 140))  # pretraining stops here (then evaluates, exports, and eval runs)
FT_DEADLINE=$((START + BUDGET - 50))    # fine-tuning stops here (then the test windows)
HARD_END=$((START + BUDGET - 12))       # anything still running is killed here; then the report

rm -rf "$ROOT/results" "$ROOT/logs" "$ROOT/pretrain" "$ROOT/finetune"
mkdir -p "$ROOT/results" "$ROOT/logs" "$OUT"
rm -f "$OUT"/dna-*.png "$OUT"/report.md "$OUT"/summary.json "$OUT"/results.tar.gz  # this script's own files only
: > "$OUT/progress.log"
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/progress.log"; }

if [ "$SMOKE" != 1 ] && [ -d .whl ]; then  # hydra, omegaconf, biopython are not on the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "pip install of .whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
DATA=(data.path="$MAF" data.cache_dir="$CACHE")
log "start: smoke=$SMOKE budget=${BUDGET}s; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
[ -f "$MAF" ] || { log "missing $MAF: copy the maffilter-examples alignment there (see docs/dna.md)"; exit 1; }

pack() {  # results, job logs, CSV metrics and configs -> $OUT/results.tar.gz (replaced atomically)
  tar czf "$OUT/.results.tar.gz.tmp" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='checkpoints' \
    -C "$ROOT" results logs $(cd "$ROOT" && ls -d pretrain finetune 2>/dev/null) 2>/dev/null \
    && mv -f "$OUT/.results.tar.gz.tmp" "$OUT/results.tar.gz"
}
monitor() {  # every 20 s: GPU memory and load into the progress log, and a fresh pack
  while sleep 20; do
    log "gpu: $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | tr '\n' ' ')" \
        "done: $(ls "$ROOT/results" | wc -l) results"
    pack
  done
}

# job DEADLINE NAME COMMAND OVERRIDES...: one scripts/gpu_dna.py run, killed at HARD_END at the latest.
job() {
  local deadline=$1 name=$2; shift 2
  local limit=$((HARD_END - $(date +%s)))
  if [ "$limit" -lt 20 ]; then log "skip $name: ${limit}s left"; return 1; fi
  log "start $name"
  timeout -k 5 "$limit" python3 scripts/gpu_dna.py run --result "$ROOT/results/$name.json" \
    ${deadline:+--deadline "$deadline"} -- "$@" > "$ROOT/logs/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc: $(grep -h -E '^(val |test accuracy|loss |\[deadline\] wall)' "$ROOT/logs/$name.log" | tail -n 2 | tr '\n' ' ')"
  [ "$rc" = 0 ] || tail -n 5 "$ROOT/logs/$name.log" | sed "s/^/    $name: /" | tee -a "$OUT/progress.log"
  return "$rc"
}

contexts_for() {  # powers of 4 from 16 with room for SCORE targets, then the longest: [16,64,...,L-SCORE]
  local len=$1 c=16 out=""
  while [ $((c + SCORE)) -lt "$len" ]; do out+="$c,"; c=$((c * 4)); done
  echo "[${out}$((len - SCORE))]"
}

chain() {  # FAMILY LENGTH: pretrain, then its eval and (length in WINDOWS) its species fine-tuning
  local fam=$1 len=$2 name=$1-$2
  local batch=$((TOKENS / len)) ewin=$((EVAL_TOKENS / len)) ckpt=true
  [ "$ewin" -ge 8 ] || ewin=8
  [ "$name" = "$NO_CHECKPOINTING" ] && ckpt=false
  job "$PRE_DEADLINE" "pretrain-$name" pretrain model="$fam" trainer=$TRAINER "${DATA[@]}" \
    seq_len="$len" batch_size="$batch" trainer.max_steps=$STEPS optim.lr=$LR optim.warmup_steps=$WARMUP \
    trainer.val_check_interval=$STEPS trainer.limit_val_batches=1 trainer.log_every_n_steps=1 \
    trainer.num_workers=$WORKERS trainer.tensorboard=false trainer.activation_checkpointing=$ckpt \
    eval_windows=$ewin run.dir="$ROOT/pretrain/$name" || return 1
  local eb=$(( 524288 / (len + SCORE) )); [ "$eb" -ge 1 ] || eb=1; [ "$eb" -le 64 ] || eb=64
  job "" "eval-$name" eval checkpoint="$ROOT/pretrain/$name" max_windows=$EVAL_WINDOWS score_len=$SCORE \
    "contexts=$(contexts_for "$len")" batch_size=$eb &
  if [[ " ${WINDOWS[*]} " == *" $len "* ]]; then
    local fb=$((TOKENS / len)); [ "$fb" -le 32 ] || fb=32
    job "$FT_DEADLINE" "species-$name" finetune task=species task.window="$len" pretrained="$ROOT/pretrain/$name" \
      model="$fam" trainer=$TRAINER "${DATA[@]}" head.mode=rc batch_size=$fb trainer.max_steps=$FT_STEPS \
      optim.lr=$FT_LR optim.warmup_steps=$FT_WARMUP trainer.val_check_interval=$FT_STEPS trainer.limit_val_batches=1 \
      trainer.log_every_n_steps=1 trainer.num_workers=$WORKERS trainer.tensorboard=false \
      trainer.activation_checkpointing=true eval_per_class=$PER_CLASS run.dir="$ROOT/finetune/species-$name" &
  fi
  wait
}

log "building the base cache once"
python3 -m domains.dna prepare "${DATA[@]}" > "$ROOT/logs/prepare.log" 2>&1 || { log "prepare failed:"; tail -n 20 "$ROOT/logs/prepare.log"; exit 1; }
log "$(head -n 1 "$ROOT/logs/prepare.log")"

monitor &
MONITOR=$!
CHAINS=()
for len in "${LENGTHS[@]}"; do  # longest first: it is the critical path
  for fam in "${FAMILIES[@]}"; do
    chain "$fam" "$len" &
    CHAINS+=($!)
  done
done
for pid in "${CHAINS[@]}"; do wait "$pid"; done
kill "$MONITOR" 2>/dev/null; wait "$MONITOR" 2>/dev/null

log "all jobs ended; report"
title="$( [ "$SMOKE" = 1 ] && echo "CPU smoke" || nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $(date -u +%Y-%m-%d)"
python3 scripts/gpu_dna.py report --runs "$ROOT" --out "$OUT" --title "$title" > "$ROOT/logs/report.log" 2>&1 \
  || { log "report failed:"; tail -n 20 "$ROOT/logs/report.log" | tee -a "$OUT/progress.log"; }
pack
cat "$OUT/report.md" 2>/dev/null
log "done: $(ls "$ROOT/results" | wc -l) results"
