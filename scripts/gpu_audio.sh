#!/usr/bin/env bash
# docs/audio.md's GPU results in ONE time-boxed call on one GPU: eight trainings side by side, then the
# test NLL of each and unconditional digit samples, packed under $OUT.
#
#   python scripts/gpu_audio.py pack             # here, once: .audio_data/ (FLAC data caches + wheels from
#                                                # .whl/ and .audio_whl/: soundfile, cffi, pycparser, Hydra)
#   bash scripts/gpu_audio.sh                    # on the GPU machine; carry .audio_data
#   SMOKE=1 bash scripts/gpu_audio.sh            # the same pipeline on a CPU, tiny and short
#
# Jobs (each `python scripts/gpu_audio.py job`, one process, bf16 on the GPU):
#   music-{mamba,s4d}-{16000,64000,256000}: SaShiMi + Mamba-1 (d_model 32) and SaShiMi + S4D (d_model 36,
#     the same parameter count within 6%) on the rendered MIDI pieces, contexts 1 s, 4 s and 16 s at
#     262144 samples a step (batch 16, 4, 1); test NLL of each at all three contexts.
#   digits-{mamba,s4d}: the same two models on the spoken digits, one-second clips, batch 16; test NLL
#     at 2000 and 16000 samples, then GEN unconditional one-second samples each (after every training
#     has ended: decoding is latency-bound and would crawl beside the trainings).
# CONTEXTS="16000 256000" picks the music contexts, MUSIC=0 leaves the music jobs out, DIGITS=0 the digits jobs (fewer jobs
# sharing the GPU: more steps each), MIN_STEPS=N keeps a group's step count from being projected below N
# (the projection is made while every member shares the GPU, so it undercounts once the fast ones end;
# the deadline still stops a run).
# Every training ends by TRAIN_UNTIL (scripts/gpu_audio.py's WallClockBudget sets the step count from
# the measured rate, equal within each group); everything is killed at HARD_END; results are re-packed
# every 20 s so that a kill still returns them.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_audio_out}
WORK=${WORK:-/tmp/gpu_audio}
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK"/{logs,results,runs,samples,group}

if ! python3 -c "import hydra, omegaconf, soundfile" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .audio_data/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
CACHE=data.cache_dir=.audio_data/data_cache

if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_UNTIL=$((T0 + ${SMOKE_TRAIN_SECONDS:-150})); HARD_END=$((T0 + ${SMOKE_SECONDS:-400}))
  CONTEXTS=(500 1000 2000); TOKENS=2000; MAX_STEPS=40; GEN=2; GEN_SECONDS=0.02; EVAL_TOKENS=8000
  EVAL_LIMIT=(--eval-max-windows 8)
  DIGITS_LEN=1000; DIGITS_BATCH=2; DIGITS_EVAL=500,1000
  COMMON=(trainer=cpu trainer.num_workers=0 trainer.limit_val_batches=2 trainer.log_every_n_steps=2
          optim.warmup_steps=3 model.config.d_model=8)
  S4D_WIDTH=()
else
  TRAIN_UNTIL=$((T0 + ${TRAIN_SECONDS:-245})); HARD_END=$((T0 + ${TOTAL_SECONDS:-395}))
  CONTEXTS=(${CONTEXTS:-16000 64000 256000}); TOKENS=262144; MAX_STEPS=${MAX_STEPS:-3000}; GEN=${GEN:-64}; GEN_SECONDS=1.0
  EVAL_TOKENS=524288; DIGITS_LEN=16000; DIGITS_BATCH=16; DIGITS_EVAL=2000,16000
  COMMON=(trainer.num_workers=2)
  S4D_WIDTH=(model.config.d_model=36); EVAL_LIMIT=()
fi

{ echo "start $(date -u +%FT%TZ) smoke=${SMOKE:-0} train_until=+$((TRAIN_UNTIL - T0))s hard_end=+$((HARD_END - T0))s"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  nvidia-smi -L 2>/dev/null; nproc; } > "$WORK/logs/machine.txt" 2>&1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/logs/gpu_util.csv" 2>&1 &
  SMI=$!
fi

pack_results() {  # results, logs, report (small) -> one archive, replaced atomically
  for run in "$WORK"/runs/*/; do
    [ -f "$run/logs/metrics.csv" ] && mkdir -p "$WORK/curves" && cp "$run/logs/metrics.csv" "$WORK/curves/$(basename "$run").csv"
  done
  python3 scripts/gpu_audio.py report --results "$WORK/results" --out "$WORK/report" --curves "$WORK/curves" \
    > "$WORK/logs/report.txt" 2>&1
  tar czf "$OUT/.results.tmp" -C "$WORK" logs results report $(cd "$WORK" && ls -d curves 2>/dev/null) 2>/dev/null \
    && mv "$OUT/.results.tmp" "$OUT/audio_results.tar.gz"
}
( while true; do sleep 20; pack_results; done ) &
PACKER=$!

job() {  # job NAME FAMILY GROUP GROUP_SIZE [job options] -- overrides
  local name=$1 family=$2 group=$3 size=$4; shift 4
  timeout -k 5 $((HARD_END - $(date +%s))) python3 scripts/gpu_audio.py job --name "$name" --family "$family" \
    --group "$group" --group-size "$size" --group-dir "$WORK/group" --results "$WORK/results" --runs "$WORK/runs" \
    --samples "$WORK/samples" --train-until "$TRAIN_UNTIL" --max-steps "$MAX_STEPS" --min-steps "${MIN_STEPS:-1}" "$@" \
    > "$WORK/logs/$name.log" 2>&1
  echo "$name exit $? at +$(( $(date +%s) - T0 ))s" >> "$WORK/logs/jobs.txt"
}

pids=()
[ "${MUSIC:-1}" = 1 ] || CONTEXTS=()
for family in mamba s4d; do
  width=(); [ $family = s4d ] && width=("${S4D_WIDTH[@]}")
  for ctx in "${CONTEXTS[@]}"; do
    job music-$family-$ctx $family music $((2 * ${#CONTEXTS[@]})) --eval-contexts "$(IFS=,; echo "${CONTEXTS[*]}")" \
      --eval-tokens "$EVAL_TOKENS" "${EVAL_LIMIT[@]}" \
      -- experiment=music-gpu model=sashimi-$family "${width[@]}" seq_len=$ctx batch_size=$((TOKENS / ctx)) \
      $CACHE "${COMMON[@]}" &
    pids+=($!)
  done
done
all=$(for f in mamba s4d; do for c in "${CONTEXTS[@]}"; do printf "music-%s-%s," $f $c; done; done)digits-mamba,digits-s4d
for family in $([ "${DIGITS:-1}" = 1 ] && echo mamba s4d); do
  width=(); [ $family = s4d ] && width=("${S4D_WIDTH[@]}")
  job digits-$family $family digits 2 --eval-contexts "$DIGITS_EVAL" --eval-tokens "$EVAL_TOKENS" "${EVAL_LIMIT[@]}" \
    --generate "$GEN" --seconds "$GEN_SECONDS" --wait-for "$all" --wait-until $((TRAIN_UNTIL + 60)) \
    -- experiment=digits-gpu model=sashimi-$family "${width[@]}" data.clips_per_voice=1 seq_len=$DIGITS_LEN \
    batch_size=$DIGITS_BATCH $CACHE "${COMMON[@]}" &
  pids+=($!)
done
wait "${pids[@]}"

kill $PACKER 2>/dev/null; [ -n "${SMI:-}" ] && kill $SMI 2>/dev/null
pack_results
cp "$WORK/report/report.md" "$OUT/report.md" 2>/dev/null
tar cf "$OUT/samples.tar" -C "$WORK" samples 2>/dev/null
# The exports (model.safetensors + config.json), for more samples / evaluation on another machine.
for group in digits music-mamba music-s4d; do
  exports=$(cd "$WORK/runs" && ls -d $group*/export 2>/dev/null)
  [ -n "$exports" ] && tar cf "$OUT/exports_$group.tar" -C "$WORK/runs" $exports
done
echo "done at +$(( $(date +%s) - T0 ))s"
cat "$WORK/logs/jobs.txt"; cat "$WORK/report/report.md" 2>/dev/null
