#!/usr/bin/env bash
# The kernels' GPU evidence (docs/benchmarks.md, docs/kernels/), time-boxed parts on one GPU:
#
#   ssd         scripts/gpu_checks/ssd.py: both SSD designs' checks at real shapes (kernels compiled in
#               parallel), their timings beside mamba_ssm's, per-kernel profiles;
#   check       scripts/gpu_check.py --ops models,mamba_decode: the 130M Mamba-1 / Mamba-2 models converted
#               from mamba_ssm (logits and training-step gradients) and the fused decode steps;
#   train       scripts/bench_training.py: 130M training tokens/s, ours (both SSD designs) beside mamba_ssm's
#               MambaLMHeadModel, 3 interleaved rounds in one process, eager and with trainer.compile's
#               per-block torch.compile;
#   train_long  Mamba-2 at B2 x L16384 with both SSD designs (where the fused one is faster alone: which
#               design is the default at long L);
#   generate    scripts/bench_generate.py --breakdown: mamba1-130m throughput at batch 1 and 64 beside
#               mamba_ssm's generate(cg=True), and where a generate call's time goes;
#   generate_all  the same throughput table for the four 130M presets (no breakdown);
#   decode2     scripts/gpu_checks/mamba_decode.py --mamba2-only --skip-checks: the fused Mamba-2 block
#               step's time against the op-by-op step, which decides whether it becomes the default;
#   models      scripts/gpu_check.py --ops models: the whole-model cross-check alone (its Triton
#               compilation takes most of the check part's limit);
#   latency     scripts/bench_generate.py --only latency: hybrid-130m vs transformer++-125m ms per decoding
#               step at 2K .. 128K of context, batch 1, 16 and 32.
#
# All parts together take longer than one device call (600 s), so PARTS picks them; two calls:
#
#   OUT=<folder> PARTS="check train" bash scripts/gpu_kernels.sh                     # ~410 s
#   OUT=<folder> PARTS="ssd train_long generate decode2" bash scripts/gpu_kernels.sh # ~450 s
#
# on the GPU machine, with mamba_ssm AND causal_conv1d unpacked on PYTHONPATH (mamba_ssm's Mamba-2
# module calls causal_conv1d; carry .baselines, and start the command with
#   mkdir -p /tmp/site && for t in .baselines/*.tar.xz; do tar xJf "$t" -C /tmp/site; done; export PYTHONPATH=/tmp/site:$PWD
# ). Each part's log is $OUT/<part>.log (scripts/gpu_bench_all.sh); limits in seconds are the *_S
# variables below.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
declare -A limit=([ssd]=${SSD_S:-190} [check]=${CHECK_S:-170} [train]=${TRAIN_S:-240}
                  [train_long]=${TRAIN_LONG_S:-120} [generate]=${GEN_S:-80} [decode2]=${DECODE2_S:-60}
                  [models]=${MODELS_S:-220} [latency]=${LATENCY_S:-200} [generate_all]=${GEN_ALL_S:-150})
declare -A command=(
  [ssd]="python3 scripts/gpu_checks/ssd.py --short --profile --jobs 8 --budget $(( ${SSD_S:-190} - 10 ))"
  [check]="python3 scripts/gpu_check.py --ops models,mamba_decode --out $OUT/check.md"
  [train]="python3 scripts/bench_training.py --presets mamba1-130m mamba2-130m --steps 5 --warmup 2 --rounds 3 --ssd-designs first,fused --compile"
  [train_long]="python3 scripts/bench_training.py --presets mamba2-130m --batch 2 --seq-len 16384 --steps 3 --warmup 2 --rounds 2 --ssd-designs first,fused"
  [generate]="python3 scripts/bench_generate.py --only throughput --presets mamba1-130m --breakdown"
  [decode2]="python3 scripts/gpu_checks/mamba_decode.py --mamba2-only --skip-checks"
  [models]="python3 scripts/gpu_check.py --ops models --out $OUT/models.md"
  [latency]="python3 scripts/bench_generate.py --only latency --latency-batches 1 16 32"
  [generate_all]="python3 scripts/bench_generate.py --only throughput"
)
specs=()
for part in ${PARTS:-ssd check train train_long generate decode2}; do
  if [ -z "${command[$part]:-}" ]; then
    echo "gpu_kernels.sh: unknown part '$part'; choose from: ${!command[*]}" >&2
    exit 2
  fi
  specs+=("$part:${limit[$part]}:${command[$part]}")
done
bash scripts/gpu_bench_all.sh "${specs[@]}"
