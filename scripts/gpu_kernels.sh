#!/usr/bin/env bash
# The kernels' GPU evidence (docs/benchmarks.md, docs/kernels/) in one time-boxed call on one GPU:
#
#   1. scripts/gpu_checks/ssd.py: both SSD designs' checks at real shapes (kernels compiled in parallel),
#      their timings beside mamba_ssm's, per-kernel profiles;
#   2. scripts/gpu_check.py --ops models,mamba_decode: the 130M Mamba-1 / Mamba-2 models converted from
#      mamba_ssm (logits and training-step gradients) and the fused decode steps; with the fused SSD
#      design when step 1 passed all its checks (SSM_SUITE_SSD_TRITON=fused), else the default one;
#   3. scripts/bench_training.py: 130M training tokens/s, ours (both SSD designs) beside mamba_ssm's
#      MambaLMHeadModel, 3 interleaved rounds in one process, eager and with trainer.compile's per-block
#      torch.compile; then Mamba-2 at B2 x L16384 with both SSD designs (where the fused one is faster
#      alone: which design is the default at long L);
#   4. scripts/bench_generate.py --breakdown: mamba1-130m throughput at batch 1 and 64 beside
#      mamba_ssm's generate(cg=True), and where a generate call's time goes;
#   5. scripts/gpu_checks/mamba_decode.py --mamba2-only --skip-checks: the fused Mamba-2 block step's time
#      against the op-by-op step (batch 1 to 64), which decides whether it becomes the default.
#
#   OUT=<folder> bash scripts/gpu_kernels.sh     # on the GPU machine, mamba_ssm AND causal_conv1d unpacked on
#                                                # PYTHONPATH (mamba_ssm's Mamba-2 module calls causal_conv1d)
#
# Each step's log is $OUT/<step>.log (scripts/gpu_bench_all.sh); limits in seconds are the variables below.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
bash scripts/gpu_bench_all.sh \
  ssd:"${SSD_S:-190}":"python3 scripts/gpu_checks/ssd.py --short --profile --jobs 8 --budget $(( ${SSD_S:-190} - 10 ))"
design=first
if grep -q "^checks: 0 failed" "$OUT/ssd.log" && ! grep -q "| FAIL |" "$OUT/ssd.log"; then design=fused; fi
echo "SSD design for the model checks and training: $design"
export SSM_SUITE_SSD_TRITON=$design
bash scripts/gpu_bench_all.sh \
  check:"${CHECK_S:-170}":"python3 scripts/gpu_check.py --ops models,mamba_decode --out $OUT/check.md" \
  train:"${TRAIN_S:-240}":"python3 scripts/bench_training.py --presets mamba1-130m mamba2-130m --steps 5 --warmup 2 --rounds 3 --ssd-designs first,fused --compile" \
  train_long:"${TRAIN_LONG_S:-120}":"python3 scripts/bench_training.py --presets mamba2-130m --batch 2 --seq-len 16384 --steps 3 --warmup 2 --rounds 2 --ssd-designs first,fused" \
  generate:"${GEN_S:-80}":"python3 scripts/bench_generate.py --only throughput --presets mamba1-130m --breakdown" \
  decode2:"${DECODE2_S:-60}":"python3 scripts/gpu_checks/mamba_decode.py --mamba2-only --skip-checks"
