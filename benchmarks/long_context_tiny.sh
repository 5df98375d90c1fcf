#!/usr/bin/env bash
# Length curves and needle retrieval of attention, lightning, GLA and DeltaNet on the tiny config, in
# one command (from the repository root, the package installed):
#
#   benchmarks/long_context_tiny.sh                  # writes benchmarks/results/{length,niah}_tiny_cpu.*
#   RUNS=/tmp/lc OUT=/tmp/res benchmarks/long_context_tiny.sh
#
# 1. `lmstack compare` trains configs/tiny.yaml once per mixer (150 steps at seq_len 256, each its own
#    `lmstack train`) and exports each run to RUNS/runs/<mixer>/hf; its MQAR probe, lm-eval and length
#    stages are skipped here (the two commands below measure length and retrieval for all four at once).
#    Run the script again after an interruption: finished stages are skipped, training resumes.
# 2. `lmstack eval length`: held-out loss per position bucket at 256 (the training length) ... 4096.
# 3. `lmstack eval niah`: RULER's three single-needle forms at 256, 1024 and 4096 tokens, three depths.
set -euo pipefail

RUNS=${RUNS:-runs/long-context-tiny}
OUT=${OUT:-benchmarks/results}
MIXERS=(attention lightning gla deltanet)
mkdir -p "$OUT"

lmstack prepare-data configs/tiny.yaml
lmstack compare configs/tiny.yaml --mixers "$(IFS=,; echo "${MIXERS[*]}")" --out "$RUNS" \
    --mqar none --tasks none --length-factor 0
exports=()
for mixer in "${MIXERS[@]}"; do exports+=("$RUNS/runs/$mixer/hf"); done
lmstack eval length "${exports[@]}" --data data/default --lengths 256,512,1024,2048,4096 --bucket-size 64 \
    -o "$OUT/length_tiny_cpu" >/dev/null
lmstack eval niah "${exports[@]}" --data data/default --lengths 256,1024,4096 --depths 0,0.5,1 --samples 2 \
    -o "$OUT/niah_tiny_cpu" >/dev/null
