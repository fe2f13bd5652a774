#!/usr/bin/env bash
# One GPU call, several benchmark scripts, each under its own time limit, every output kept.
#
#   bash scripts/gpu_bench_all.sh NAME:SECONDS:"COMMAND" [...]
#
# e.g.  bash scripts/gpu_bench_all.sh memory:60:"python3 scripts/report_memory.py" \
#           long:240:"python3 scripts/bench_long_context.py"
# Each command's stdout+stderr go to $OUT/NAME.log (OUT defaults to ./gpu_out); a summary of exit
# codes and wall times is printed at the end. A command that runs past its limit is killed, the
# next one still runs. Environment set-up (PYTHONPATH, the baselines) is the caller's.
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
summary=()
echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo none)  date: $(date -u +%F' '%T) UTC"
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  echo "=== $name (limit ${limit}s): $cmd"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$out/$name.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  grep -v "━━\|it/s" "$out/$name.log" | tail -n 40
  summary+=("$name rc=$rc wall=${wall}s")
done
echo "=== summary"; printf '%s\n' "${summary[@]}"
