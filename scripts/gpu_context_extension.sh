#!/usr/bin/env bash
# docs/long_context.md's context extension on one GPU, time-boxed: the 130M Mamba-2-Hybrid trained at 2K
# (experiment=hybrid-130m-gpu, fewer steps), then the shipped recipe experiment=context-extension-hybrid-130m
# (16K -> 32K -> 128K, each stage from the previous export), then probes of the 128K model (needle in a
# haystack and perplexity by position) at lengths past what each stage trained on.
#
#   OUT=<folder> bash scripts/gpu_context_extension.sh     # on the GPU machine; carry .whl (or WHL=.whl_lm) and .corpus
#   SMOKE=1 bash scripts/gpu_context_extension.sh          # CPU: experiment=smoke + context-extension-smoke
#
# Step counts are variables (BASE_STEPS, STEPS_16K, STEPS_32K, STEPS_128K; the config's are 150/150/40),
# and so are the models probed (PROBE_STAGES: stage names and base, the 2K model; default all)
# so that one device call holds the whole chain; each command also has a wall-clock limit. Logs under
# $OUT: base.log, extension.log, probe.log, and metrics.tar.gz (every stage's CSV metrics, resolved
# configs and results, the probes' JSON; no weights).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ "$SMOKE" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl \
    || { echo "pip install of ${WHL:-.whl} failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  # The default corpus (python3.11-doc's sources) where domains/lm/corpus.py looks for it.
  if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
    mkdir -p /usr/share/doc/python3.11/html && tar xJf .corpus/python-docs.tar.xz -C /usr/share/doc/python3.11/html \
      || { echo "could not unpack .corpus/python-docs.tar.xz"; exit 1; }
  fi
  BASE=(experiment=hybrid-130m-gpu trainer.max_steps=${BASE_STEPS:-300} optim.warmup_steps=50
        trainer.val_check_interval=${BASE_STEPS:-300} trainer.limit_val_batches=16 trainer.max_time=00:00:02:30)
  EXT=(experiment=context-extension-hybrid-130m
       stages.0.trainer.max_steps=${STEPS_16K:-100} stages.0.trainer.val_check_interval=${STEPS_16K:-100}
       stages.1.trainer.max_steps=${STEPS_32K:-80} stages.1.trainer.val_check_interval=${STEPS_32K:-80}
       stages.2.trainer.max_steps=${STEPS_128K:-30} stages.2.trainer.val_check_interval=${STEPS_128K:-30})
  FINAL=runs/lm/hybrid-130m-context-extension; STAGES=(16k 32k 128k); BASE_DIR=runs/lm/hybrid-130m-python-docs
  LENGTHS="[4096,16384,65536,131072]"; PPL_LENGTHS="[16384,65536]"; SAMPLES=8
  # A needle probe of 8 prompts at 4K..128K took over 40 s a model on the H100 (2026-11-25: cut at 131072).
  BASE_S=${BASE_S:-200}; EXT_S=${EXT_S:-330}; PROBE_S=${PROBE_S:-90}
else
  BASE=(experiment=smoke trainer.tensorboard=false)
  EXT=(experiment=context-extension-smoke)
  FINAL=runs/lm/context-extension-smoke; STAGES=(s64 s128 s256); BASE_DIR=runs/lm/smoke
  LENGTHS="[256,512]"; PPL_LENGTHS="[128,256]"; SAMPLES=2
  BASE_S=300; EXT_S=400; PROBE_S=200
fi
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
stamp "base model: ${BASE[*]}"
timeout -k 10 "$BASE_S" python3 -m domains.lm train "${BASE[@]}" > "$OUT/base.log" 2>&1
stamp "base rc=$?"; grep -E "val |unigram|Error|error" "$OUT/base.log" | tail -n 5
stamp "extension: ${EXT[*]}"
timeout -k 10 "$EXT_S" python3 -m domains.lm train "${EXT[@]}" > "$OUT/extension.log" 2>&1
stamp "extension rc=$?"; grep -E "stage|val |Error|error" "$OUT/extension.log" | grep -v "it/s" | tail -n 12
last=""
for name in "${STAGES[@]}"; do [ -d "$FINAL/$name/export" ] && last="$FINAL/$name/export"; done
if [ -n "$last" ]; then
  mkdir -p runs/lm/probes
  for name in ${PROBE_STAGES:-base ${STAGES[*]}}; do  # the needle at every length: how far each model reaches
    export_dir="$FINAL/$name/export"; [ "$name" = base ] && export_dir="$BASE_DIR/export"
    [ -d "$export_dir" ] || continue
    timeout -k 5 "$PROBE_S" python3 -m domains.lm probe checkpoint="$export_dir" probe=niah_single lengths="$LENGTHS" \
      samples=$SAMPLES batch_size=1 output="runs/lm/probes/niah-$name.json" 2>&1 | grep -v "^\[data\]" | tee -a "$OUT/probe.log" | tail -n 6
    stamp "probe niah $name rc=${PIPESTATUS[0]}"
  done
  timeout -k 5 "$PROBE_S" python3 -m domains.lm probe checkpoint="$last" probe=ppl_by_position lengths="$PPL_LENGTHS" \
    samples=2 batch_size=1 output="runs/lm/probes/ppl-by-position.json" 2>&1 | grep -v "^\[data\]" | tee -a "$OUT/probe.log" | tail -n 6
  stamp "probe ppl_by_position rc=${PIPESTATUS[0]}"
fi
tar czf "$OUT/metrics.tar.gz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='checkpoints' \
  --exclude='*.pt' --exclude='*.bin' $(ls -d runs/lm/probes "${BASE_DIR:-}" "$FINAL" 2>/dev/null) 2>/dev/null
stamp "done"
